"""erm inside TRL: the endogenous reward as a reward function, fused log-probs for GRPOTrainer,
and drop-ins for TRL's `selective_log_softmax` / `entropy_from_logits`.

    from trl import GRPOConfig, GRPOTrainer
    from erm.integrations.trl import endogenous_reward_func

    reward = endogenous_reward_func(None)                 # embedded SmolLM2-135M-Instruct
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(...),
                          train_dataset=ds)

TRL calls a reward function as `f(prompts=..., completions=..., completion_ids=..., **columns)`
and logs it under `f.__name__`. Both dataset formats work:

* standard: prompts and completions are strings; a prompt is scored as one user turn of the
  reward model's chat template (the raw text otherwise);
* conversational: prompts are message lists, completions are [{"role": "assistant",
  "content": ...}] lists (the assistant contents are joined).

Scoring is delegated to `erm.EndoRM.score` (length-bucketed batches, the fused LM-head op). A
completion that ended with an end-of-turn/EOS token is scored as a terminated episode (the end token
counted, value 0 after it); one that TRL cut at max_completion_length is scored as truncated (no end
token, the soft value of the next state closes the sum). Which is which is read from the
`completion_ids` TRL passes, assuming the policy shares the reward model's tokenizer (as when both
start from the same base model); `detect_truncation=False` scores every completion as terminated.
Where TRL passes `log_metric`, the mean reward per response token and the fraction of completions
scored as truncated are logged as `<name>/per_token` and `<name>/truncated`.

Fused log-probs for TRL's own trainers, and drop-ins for its two softmax helpers:

    from erm.integrations.trl import use_erm_logprobs, selective_log_softmax, entropy_from_logits

    trainer = GRPOTrainer(model=policy, reward_funcs=[...], args=GRPOConfig(...), train_dataset=ds)
    use_erm_logprobs(trainer)      # per-token log-probs and entropies via erm.linear_token_stats
    trainer.train()

Only `use_erm_logprobs` imports trl (when called).
"""
import types
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .._checks import check_reduction
from ..constants import IGNORE_INDEX
from ..model import reduce_rewards

__all__ = ["endogenous_reward_func", "EndogenousRewardFunc", "use_erm_logprobs",
           "selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"]


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):  # conversational: [{"role": "assistant", ...}, ...]
        return "".join(_content(m.get("content", "")) for m in completion
                       if isinstance(m, dict) and m.get("role", "assistant") == "assistant")
    raise TypeError(f"a completion must be a string or a list of messages, got "
                    f"{type(completion).__name__}")


def _content(content) -> str:
    """A message content as text: a string, or TRL/OpenAI content parts ({"type": "text",
    "text": ...}) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    raise TypeError(f"a message content must be a string or a list of parts, got "
                    f"{type(content).__name__}")


def _prompt(prompt):
    """A TRL prompt as what `erm.lm.messages` takes (a string or string-content messages)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        return [{**m, "content": _content(m.get("content", ""))} for m in prompt]
    raise TypeError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")


class EndogenousRewardFunc:
    """Callable `(prompts, completions, **kwargs) -> list[float]` backed by an `erm.EndoRM`.

    Attributes:
        rm: the EndoRM. reduction: "sum" | "mean". system_prompt: passed to every score call.
        empty_reward: returned for empty completions (EndoRM cannot score an empty response);
            None (default) becomes NaN in TRL, which drops it from the reward sum.
        __name__: "endogenous_reward" (the name TRL logs the reward under).
    """

    def __init__(self, rm, *, reduction: str = "sum", system_prompt: Optional[str] = None,
                 empty_reward: Optional[float] = None, name: str = "endogenous_reward",
                 detect_truncation: bool = True):
        check_reduction(reduction)
        self.rm = rm
        self.reduction = reduction
        self.system_prompt = system_prompt
        self.empty_reward = empty_reward
        self.detect_truncation = detect_truncation
        self.__name__ = name

    def _terminated(self, completion_ids, n: int) -> List[bool]:
        """Per completion: did it end with an end-of-turn / EOS id (True when unknown)?"""
        if not self.detect_truncation or completion_ids is None or len(completion_ids) != n:
            return [True] * n
        ends = set(self.rm.end_ids)
        out = []
        for ids in completion_ids:
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            out.append(bool(ids) and int(ids[-1]) in ends)
        return out

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> List[Optional[float]]:
        """Score N (prompt, completion) pairs; returns N floats (empty_reward for empty ones)."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        texts = [_text(c) for c in completions]
        term = self._terminated(kwargs.get("completion_ids"), len(texts))
        keep = [i for i, t in enumerate(texts) if t.strip()]
        out: List[Optional[float]] = [self.empty_reward] * len(texts)
        if keep:
            sums, lengths = self.rm.response_rewards(
                [_prompt(prompts[i]) for i in keep], [texts[i] for i in keep],
                system_prompt=self.system_prompt, progress=False,
                terminated=[term[i] for i in keep])
            per_token = reduce_rewards(sums, lengths, "mean")
            scores = reduce_rewards(sums, lengths, self.reduction)
            for i, s in zip(keep, scores.tolist()):
                out[i] = float(s)
            log_metric = kwargs.get("log_metric")
            if callable(log_metric):
                log_metric(f"{self.__name__}/per_token", float(per_token.mean()))
                log_metric(f"{self.__name__}/truncated",
                           sum(not term[i] for i in keep) / len(keep))
        return out

    def __repr__(self) -> str:
        return f"EndogenousRewardFunc({self.rm!r}, reduction={self.reduction!r})"


def endogenous_reward_func(model_or_rm=None, tokenizer=None, *, alpha: float = 1.0,
                           reduction: str = "sum", system_prompt: Optional[str] = None,
                           batch_size: int = 8, empty_reward: Optional[float] = None,
                           detect_truncation: bool = True,
                           device=None, dtype=None) -> Callable[..., List[Optional[float]]]:
    """A TRL reward function computing the endogenous reward of each completion.

    Args:
        model_or_rm: an `erm.EndoRM` (used as is), a transformers causal LM (needs `tokenizer`),
            a model name / local path, or None for the embedded default model. The model is used
            frozen, under inference mode; pass a *separate* copy from the policy being trained.
        tokenizer: the tokenizer of a model object (its chat template renders the prompts).
        alpha: temperature α of the soft Q-function (ignored for an EndoRM).
        reduction: "sum" (Σ_t r_t, the paper's reward) or "mean" (per response token).
        system_prompt: system message for every prompt (the paper's prompt-guided reward).
        batch_size: pairs per forward pass (ignored for an EndoRM).
        empty_reward: value for empty completions (None: NaN in TRL).
        detect_truncation: score completions that do not end with an end-of-turn/EOS id (read
            from TRL's `completion_ids`) as truncated rather than terminated.
        device, dtype: where/how to run a model that is loaded or wrapped here.
    Returns:
        `EndogenousRewardFunc`: `f(prompts, completions, **kwargs) -> list[float]` with
        `f.__name__ == "endogenous_reward"`.
    """
    from ..model import EndoRM

    if isinstance(model_or_rm, EndoRM):
        rm = model_or_rm
    elif model_or_rm is None or isinstance(model_or_rm, str):
        rm = EndoRM.from_pretrained(model_or_rm, alpha=alpha, batch_size=batch_size,
                                    device=device, dtype=dtype)
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a model object")
        rm = EndoRM(model_or_rm, tokenizer, alpha=alpha, batch_size=batch_size, device=device,
                    dtype=dtype)
    return EndogenousRewardFunc(rm, reduction=reduction, system_prompt=system_prompt,
                                empty_reward=empty_reward, detect_truncation=detect_truncation)


# ---------------------------------------------------------------------------------------------
# Drop-ins for TRL's softmax helpers (trl.trainer.utils)

def _out_dtype(logits: Tensor, dtype) -> torch.dtype:
    return logits.dtype if dtype is None else dtype


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Optional[Tensor] = None, *, dtype=None) -> Tensor:
    """log_softmax(logits / temperature) gathered at `index`, with TRL's signature and shapes.

    Equal to `torch.gather(logits.log_softmax(-1), -1, index)` (with `index.unsqueeze(-1)` and a
    squeeze for an index of shape (...)), computed by `erm.token_stats` without a full-vocabulary
    log-softmax. For an index of shape (..., K), the column with the largest logit in each row
    (the one nearest the row maximum) comes from the centred logsumexp of `erm.token_stats`,
    and the others add their logit differences (z[i_j] − z[i_ref]) / temperature to it: each
    value is as accurate as its own magnitude allows (a large common offset costs nothing, and
    a far-below-maximum column cannot spoil a near-maximum one); none is above 0.

    Precision: the statistics are accumulated in float32 whatever the logits' dtype (float64 for
    float64 logits). In bfloat16/float16, where TRL's own version computes a half-precision
    log-softmax, erm's result is much closer to the float64 value of the same logits (measured
    on (4, 32, 1024) standard-normal bf16 logits: max error 7.7e-7 with `dtype=torch.float32`
    against 3.4e-2 for TRL's; fp16: 6.8e-7 against 5.1e-3); the default output is still rounded
    to the logits' dtype, as TRL returns it.

    Args:
        logits: (..., V) float tensor.
        index: (...) or (..., K) integer ids in [0, V).
        temperature: > 0; the logits are divided by it.
        row_mask: optional tensor of index's shape; entries where it is 0 get log-prob 0 (and no
            gradient), whatever their index.
        dtype: output dtype (default: the logits' dtype, as TRL); torch.float32 keeps erm's
            float32 accuracy for half-precision logits.
    Returns:
        log-probs of index's shape. Differentiable w.r.t. logits.
    """
    from ..ops import token_stats

    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not temperature > 0:
        raise ValueError("temperature must be positive")
    squeeze = index.dim() == logits.dim() - 1
    idx = index.unsqueeze(-1) if squeeze else index
    if idx.dim() != logits.dim() or idx.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"index must have shape {tuple(logits.shape[:-1])} or "
                         f"{tuple(logits.shape[:-1])} + (K,), got {tuple(index.shape)}")
    if idx.shape[-1] == 0:
        return logits.new_zeros(index.shape, dtype=_out_dtype(logits, dtype))
    keep = None
    if row_mask is not None:
        keep = row_mask.unsqueeze(-1) if squeeze else row_mask
        keep = (keep != 0).expand(idx.shape)
        idx = idx.masked_fill(~keep, 0)   # a masked entry may hold any id
    idx = idx.long()
    if idx.shape[-1] == 1:
        out = token_stats(logits, idx[..., 0], temperature=float(temperature)).logprob[..., None]
    else:
        out = _logprobs_from_reference_column(logits, idx, float(temperature), keep)
    if keep is not None:
        out = out.masked_fill(~keep, 0.0)
    out = out.to(_out_dtype(logits, dtype))
    return out.squeeze(-1) if squeeze else out


def _logprobs_from_reference_column(logits: Tensor, idx: Tensor, temperature: float,
                                    keep: Optional[Tensor]) -> Tensor:
    """(..., K) log-probs of `idx` (..., K): `erm.token_stats` at each row's largest-logit
    column (among the kept ones), the others through their logit differences to it."""
    from ..ops import token_stats

    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = torch.gather(logits, -1, idx).to(acc)
    pick = z.detach() if keep is None else z.detach().masked_fill(~keep, float("-inf"))
    ref = pick.argmax(-1, keepdim=True)
    lp = token_stats(logits, torch.gather(idx, -1, ref)[..., 0], temperature=temperature).logprob
    diff = (z - torch.gather(z, -1, ref)) / temperature
    diff = torch.where(torch.isneginf(z), torch.full_like(diff, float("-inf")), diff)
    return (lp[..., None] + diff).clamp(max=0.0)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128, *, temperature: float = 1.0,
                        dtype=None) -> Tensor:
    """Entropy (nats) of softmax(logits) per row, with TRL's signature: `erm.entropy`.

    Args:
        logits: (..., V), any leading shape.
        chunk_size: accepted for compatibility and ignored (erm bounds its working set itself).
        temperature: > 0; the entropy of softmax(logits / temperature).
        dtype: output dtype (default: the logits', as TRL); the value is accumulated in float32
            (float64 for float64 logits), so in half precision it is closer to the float64
            entropy than a half-precision log-softmax.
    Returns:
        (...) tensor, differentiable w.r.t. logits.
    """
    from ..ops import entropy

    return entropy(logits, temperature=temperature).to(_out_dtype(logits, dtype))


def selective_log_softmax_and_entropy(logits: Tensor, index: Tensor,
                                      entropy_requires_grad: bool = True,
                                      temperature: float = 1.0,
                                      row_mask: Optional[Tensor] = None, *, dtype=None):
    """(log-probs at `index` (...), entropies (...)) from one `erm.token_stats` pass, with TRL's
    signature; rows where `row_mask` is 0 get zeros. Outputs in the logits' dtype unless `dtype`."""
    from ..ops import token_stats

    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError("temperature must be positive")
    idx = index.long()
    keep = None if row_mask is None else row_mask != 0
    if keep is not None:
        idx = idx.masked_fill(~keep, IGNORE_INDEX)
    st = token_stats(logits, idx, temperature=float(temperature), entropy=True)
    ent = st.entropy if entropy_requires_grad else st.entropy.detach()
    if keep is not None:
        ent = ent.masked_fill(~keep, 0.0)
    dt = _out_dtype(logits, dtype)
    return st.logprob.to(dt), ent.to(dt)


# ---------------------------------------------------------------------------------------------
# use_erm_logprobs: TRL's fused LM head computed by erm.linear_token_stats

def _logit_scale(text_config) -> float:
    """The factor the model multiplies its logits by (read as TRL's add_fused_lm_head does)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        s = text_config.logits_scaling
        scale = s if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / s
    return 1.0 if scale is None else float(scale)


def _has_trl_fused_head(model) -> bool:
    fn = getattr(model.forward, "__func__", model.forward)
    code = getattr(fn, "__code__", None)
    return code is not None and "fused_lm_head" in code.co_varnames


def _unsupported(model) -> Optional[str]:
    """Why erm cannot compute this model's fused head (None: it can)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return "its logits are soft-capped"
    if not _logit_scale(cfg) > 0:
        return "its logit scale is not positive"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its LM head is a {type(head).__name__}, not a Linear layer"
    return None


def _closure(fn) -> dict:
    """The variables a (bound) function closes over, by name."""
    f = getattr(fn, "__func__", fn)
    cells = getattr(f, "__closure__", None) or ()
    out = {}
    for name, cell in zip(f.__code__.co_freevars, cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    return out


def _patch_model(model, temperature: float, cast_fp32: bool) -> bool:
    """Route `model(..., fused_lm_head=True)` through erm; False when the model is left alone.
    The temperature, the float32 cast and the requested outputs are those TRL's head was built
    with (read from it), else the given ones."""
    import warnings

    if getattr(model, "_erm_prev_forward", None) is not None:
        return True  # already patched
    if not _has_trl_fused_head(model):
        raise RuntimeError(
            f"{type(model).__name__} has no TRL fused LM head: use_erm_logprobs needs a TRL whose "
            "trainer computes log-probs with `model(..., fused_lm_head=True)` (add_fused_lm_head,"
            " as TRL 1.16 does)")
    prev = model.forward
    built = _closure(prev)
    temperature = float(built.get("temperature", temperature))
    cast_fp32 = bool(built.get("cast_lm_head_to_fp32", cast_fp32))
    outputs = tuple(built.get("outputs", ("log_probs", "entropy")))
    why = _unsupported(model)
    extra = sorted(set(outputs) - {"log_probs", "entropy"})
    if why is None and extra:
        why = f"TRL asks its head for {', '.join(extra)}"
    if why is not None:
        warnings.warn(f"use_erm_logprobs: {type(model).__name__} keeps TRL's fused head ({why})",
                      stacklevel=3)
        return False
    import transformers
    from packaging.version import Version

    cfg = model.config.get_text_config()
    alpha = temperature / _logit_scale(cfg)
    with_entropy = "entropy" in outputs
    backbone_attr = "base_model"
    if cfg is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head or kwargs.get("output_router_logits") \
                or getattr(cfg, "output_router_logits", False):
            return prev(*args, fused_lm_head=fused_lm_head, labels=labels,
                        shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs)
        return _erm_fused_forward(self, getattr(self, backbone_attr), args, kwargs, labels,
                                  shift_labels, num_items_in_batch, alpha, cast_fp32,
                                  with_entropy)

    model._erm_prev_forward = prev
    model.forward = types.MethodType(forward, model)
    return True


def _erm_fused_forward(model, backbone, args, kwargs, labels, shift_labels, num_items_in_batch,
                       alpha: float, cast_fp32: bool, with_entropy: bool):
    """TRL's FusedCausalLMOutput (loss, log_probs, entropy, label_mask) computed with
    erm.linear_token_stats on the final hidden states of the positions with a label."""
    from trl.trainer.utils import FusedCausalLMOutput

    from ..ops import linear_token_stats
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # pragma: no cover
        maybe_gather_lm_head_ctx = None

    kwargs["use_cache"] = False
    out = backbone(*args, **kwargs)
    if shift_labels is None:
        hidden, labels = out.last_hidden_state[:, :-1], labels[:, 1:]
    else:
        hidden, labels = out.last_hidden_state, shift_labels
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    hidden = hidden.to(weight.device)
    labels = labels.to(weight.device)
    mask = labels != -100
    dev = hidden.device.type
    if cast_fp32:
        dt = torch.float32
    elif torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = hidden.dtype
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor parameters
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    gather = maybe_gather_lm_head_ctx(head.weight, head.bias) if maybe_gather_lm_head_ctx \
        else nullcontext()
    with torch.autocast(dev, enabled=False), gather:
        w = weight.to(dt)
        b = bias.to(dt) if bias is not None else None
        n_valid = int(mask.sum())
        if n_valid:  # only the positions with a label
            st = linear_token_stats(hidden[mask].to(dt), w, labels[mask], bias=b,
                                    temperature=alpha, entropy=with_entropy)
            lp = st.logprob.new_zeros(mask.shape).masked_scatter(mask, st.logprob)
            ent = None if st.entropy is None else \
                st.entropy.new_zeros(mask.shape).masked_scatter(mask, st.entropy)
        else:  # nothing to score: zeros that stay connected to the model
            st = linear_token_stats(hidden.to(dt), w, labels.masked_fill(~mask, IGNORE_INDEX),
                                    bias=b, temperature=alpha, entropy=with_entropy)
            lp = st.logprob
            ent = None if st.entropy is None else st.entropy.masked_fill(~mask, 0.0)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -lp.sum() / denom
    return FusedCausalLMOutput(loss=loss, log_probs=lp, entropy=ent, label_mask=mask)


def use_erm_logprobs(trainer, *, enable: bool = True):
    """Make a TRL trainer compute per-token log-probs and entropies with `erm.linear_token_stats`.

    TRL's GRPOTrainer (and RLOO/DPO/KTO/SFT trainers) compute per-token log-probs by calling the
    model with `fused_lm_head=True`, a forward TRL's `add_fused_lm_head` installs on the policy
    and on the reference model. This replaces that fused path, on this trainer's models only, by
    erm's fused LM-head op: the backbone runs as before, and the log-probs (at the trainer's
    temperature) and entropies of the labelled positions come from the final hidden states and
    the LM-head weight, in float32 accumulators, never holding (B, T, V) logits; gradients flow to
    the backbone and the head (tied embeddings too). Generation and every other forward are
    unchanged. Models whose head erm cannot express (soft-capped logits, a non-Linear head) keep
    TRL's path with a warning, and so do MoE calls asking for router logits.

    Args:
        trainer: a TRL trainer whose model carries TRL's fused head (GRPOTrainer in TRL 1.16).
        enable: False restores TRL's fused forward.
    Returns:
        the trainer.
    Raises:
        RuntimeError: the trainer's model has no TRL fused head (an older TRL).
    """
    models = []
    model = trainer.model
    if hasattr(model, "get_base_model"):  # PEFT: the head lives on the base model
        model = model.get_base_model()
    models.append(model)
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        models.append(ref)
    if not enable:
        for m in models:
            prev = getattr(m, "_erm_prev_forward", None)
            if prev is not None:
                m.forward = prev
                m._erm_prev_forward = None
        return trainer
    temperature = float(getattr(trainer, "temperature", None) or 1.0)
    cast_fp32 = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    for m in models:
        _patch_model(m, temperature, cast_fp32)
    return trainer
