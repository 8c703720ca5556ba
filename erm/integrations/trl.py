"""The endogenous reward as a TRL reward function (GRPOTrainer, RLOOTrainer, ...).

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
This module does not import trl.
"""
from typing import Callable, List, Optional, Sequence

__all__ = ["endogenous_reward_func", "EndogenousRewardFunc"]


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
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
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
            scores = self.rm.score([_prompt(prompts[i]) for i in keep], [texts[i] for i in keep],
                                   reduction=self.reduction, system_prompt=self.system_prompt,
                                   progress=False, terminated=[term[i] for i in keep])
            for i, s in zip(keep, scores.tolist()):
                out[i] = float(s)
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
