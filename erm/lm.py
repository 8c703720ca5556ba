"""The model layer: everything erm does with a Hugging Face causal LM, written once.

`EndoRM` (erm/model.py), the RL loop (erm/rl.py), the Yes/No judge (erm/judge.py), `erm show` and
the TRL adapter all load, render, encode, pad and run models through these functions:

    model, tok = load(None)                            # embedded SmolLM2-135M-Instruct, or a path
    ends = end_token_ids(model, tok)
    msgs = messages("What is 2+2?", system_prompt="Be brief.")   # one way to add a system prompt
    enc = encode_pair(tok, msgs, "4.", end_ids=ends, max_length=2048)
    ids, attn, pos = pad([enc.ids], pad_id(tok, ends), side="right")
    st = window_token_stats(model, ids, attn, start, targets, alpha=1.0)

`window_token_stats` runs the model body once and, when the LM head is a plain linear layer
(`plain_lm_head`), computes the token statistics with the fused `erm.linear_token_stats` over the
final hidden states of a window of positions, so no (B, T, V) logits tensor is ever held; other
heads fall back to the `logits_to_keep` logits and `erm.token_stats`.
"""
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .constants import IGNORE_INDEX
from .loading import (as_dtype, cap_length, check_device, context_length,  # noqa: F401
                      default_device, default_dtype, device_and_dtype, load, place)

Message = Dict[str, str]
Prompt = Union[str, Sequence[Message]]

#: Model types whose LM head is a plain linear layer (logits = hidden @ W.T + b, no scaling or
#: soft-capping): the fused LM-head op computes their statistics from the hidden states.
PLAIN_HEAD_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "smollm3", "qwen2_moe",
                              "qwen3_moe", "mixtral"})
#: End-of-turn tokens: a chat template's tail after the assistant content is cut after the first.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
              "<|end_of_text|>")
_MARK = "ERM-RESPONSE-MARK-7f3a"  # stands in for the response to find where a template puts it


class TruncationWarning(UserWarning):
    """Prompts were cut from the left to fit `max_length`.

    Attributes:
        indices: positions (in the order the pairs were given) of the pairs whose prompt was cut.
    """

    def __init__(self, message: str, indices: Sequence[int] = ()):
        super().__init__(message)
        self.indices = list(indices)


# ------------------------------------------------------------------------------------ batches
def length_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices of `lengths` longest first, in batches of at most `batch_size` (similar lengths
    share a batch, so little is padded)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------- conversations
def messages(prompt: Prompt, system_prompt: Optional[str] = None) -> List[Message]:
    """A prompt as a chat message list, with `system_prompt` put in front.

    Args:
        prompt: a string (one user turn) or a list of {"role", "content"} dicts (string values).
        system_prompt: merged into an existing leading system message (its text first, a blank
            line, then the existing text), else inserted as a new first message. None/"": none.
    Returns:
        a new list of new {"role", "content"} dicts.
    Raises:
        TypeError: a prompt of another type, a message that is not a dict, a non-string
            role or content.
        ValueError: an empty message list or a message without "role" / "content".
    """
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("a chat prompt must have at least one message")
        msgs = []
        for j, m in enumerate(prompt):
            if not isinstance(m, dict):
                raise TypeError(f"message {j} must be a dict with 'role' and 'content', got "
                                f"{type(m).__name__}")
            if "role" not in m or "content" not in m:
                raise ValueError(f"message {j} must have 'role' and 'content'")
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise TypeError(f"message {j}: 'role' and 'content' must be strings, got "
                                f"{type(m['role']).__name__} and {type(m['content']).__name__}")
            msgs.append({"role": m["role"], "content": m["content"]})
    else:
        raise TypeError("a prompt must be a string or a list of {'role', 'content'} dicts, "
                        f"got {type(prompt).__name__}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
    if system_prompt:
        if msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": system_prompt + "\n\n" + msgs[0]["content"]}
        else:
            msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def render_text(prompt: Prompt) -> str:
    """A prompt as plain text for people and for the judge: "User: ...", "Assistant: ..."."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(m['role'], m['role'].capitalize())}: {m['content']}"
                     for m in messages(prompt))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def context_text(tokenizer, msgs: Sequence[Message]) -> str:
    """The text of the context a model answers: the chat template with the generation prompt,
    or, without a template, the message contents joined by blank lines (nothing after them)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in msgs)


def context_ids(tokenizer, msgs: Sequence[Message]) -> List[int]:
    """Token ids of `context_text` (without a template, special tokens such as BOS added as the
    tokenizer does; a template writes its own)."""
    special = not has_chat_template(tokenizer)
    return tokenize(tokenizer, context_text(tokenizer, msgs), special=special)[0]


def continuations(tokenizer, msgs: Sequence[Message], texts: Sequence[str]
                  ) -> Tuple[List[int], List[List[int]]]:
    """(`context_ids(msgs)`, [token ids of each text as the model would write it right after
    that context]), the context rendered and tokenized once. A text's ids are the tokens of
    context_text + text past the context's, when those are a prefix of them (a template's
    generation prompt may end in a space or newline that merges with what follows only this
    way); else the text tokenized alone."""
    special = not has_chat_template(tokenizer)
    text0 = context_text(tokenizer, msgs)
    ctx = tokenize(tokenizer, text0, special=special)[0]
    out = []
    for text in texts:
        full = tokenize(tokenizer, text0 + text, special=special)[0]
        ok = len(full) > len(ctx) and full[:len(ctx)] == ctx
        out.append(full[len(ctx):] if ok else tokenize(tokenizer, text)[0])
    return ctx, out


def continuation_ids(tokenizer, msgs: Sequence[Message], text: str) -> List[int]:
    """Token ids of `text` as the model would write it right after `context_ids(msgs)`
    (`continuations` of one text)."""
    return continuations(tokenizer, msgs, [text])[1][0]


# ------------------------------------------------------------------------------------- tokens
def end_token_ids(model, tokenizer) -> List[int]:
    """Sorted ids that end a turn: EOS of the tokenizer, of the generation config and of the
    model config, and the end-of-turn tokens of `END_TOKENS` the vocabulary has."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        for x in (e if isinstance(e, (list, tuple)) else [e]):
            if isinstance(x, int):
                ids.add(x)
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab = tokenizer.get_vocab()
    for t in END_TOKENS:
        i = vocab.get(t)
        if i is not None and i != unk:
            ids.add(int(i))
    return sorted(ids)


def eos_id(tokenizer, end_ids: Sequence[int] = ()) -> int:
    """The id that ends a response: the tokenizer's EOS, else the smallest end id."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    if end_ids:
        return int(min(end_ids))
    raise ValueError("the tokenizer has no EOS token to end a response with")


def pad_id(tokenizer, end_ids: Sequence[int] = ()) -> int:
    """The padding id: the tokenizer's pad token, else EOS."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_id(tokenizer, end_ids)


def tokenize(tokenizer, text: str, *, special: bool = False,
             offsets: bool = False) -> Tuple[List[int], List[Tuple[int, int]]]:
    """(ids, character spans) of `text`; spans are [] unless `offsets`. A slow tokenizer's spans
    come from decoding incrementally."""
    if not text:
        return [], []
    if offsets and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if not offsets:
        return ids, []
    spans, prev = [], 0
    for i in range(len(ids)):
        n = len(tokenizer.decode(ids[:i + 1]))
        a, b = min(prev, len(text)), min(max(n, prev), len(text))
        spans.append((a, b))
        prev = b
    return ids, spans


@dataclass
class Encoded:
    """One (context, response) pair as token ids.

    ids: context + response ids; the last `n_resp` are the response (its end token included).
    offsets: per response token, its (start, end) span in the response string ([] unless asked).
    terminated: the response ends the turn (end token appended; value 0 after it).
    n_cut: context tokens cut from the left to fit max_length (0: none).
    """

    ids: List[int]
    n_resp: int
    offsets: List[Tuple[int, int]] = field(default_factory=list)
    terminated: bool = True
    n_cut: int = 0


def _template_split(tokenizer, msgs, response: str):
    """(context text, content, base, tail) with the rendering of msgs + the assistant turn equal
    to context + content + tail, where content = response[base:base + len(content)] (a template
    may strip the content). The context is what the template writes before the assistant content
    — which may be more than the generation prompt (an empty reasoning block, say). None when the
    template changes the content in another way."""
    def render(content):
        return tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": content}],
                                             tokenize=False)

    marked = render(_MARK)
    k = marked.find(_MARK)
    if k < 0:
        return None
    head, tail = marked[:k], marked[k + len(_MARK):]
    full = render(response)
    if not (full.startswith(head) and full.endswith(tail)) or len(full) < len(head) + len(tail):
        return None
    body = full[len(head):len(full) - len(tail)]
    for content in (response, response.strip()):
        if body == content and content:
            return head, content, response.find(content), tail
    return None


def encode_pair(tokenizer, prompt: Prompt, response: str, *, end_ids: Sequence[int],
                max_length: int, system_prompt: Optional[str] = None, offsets: bool = False,
                terminated: bool = True) -> Encoded:
    """Encode a response as the assistant turn after `prompt`.

    With a chat template the response is the assistant content where the template puts it, and
    the template's end-of-turn token after it is part of the response (counted, value 0 after
    it); without a template the context is the message contents and EOS ends the response.
    `terminated=False` (a response cut off mid-turn) appends no end token. A context longer than
    the room left by the response is cut from the left (`n_cut` says by how much).

    Raises:
        TypeError: a non-string response, a malformed prompt.
        ValueError: an empty response, or one that does not fit in max_length with one context
            token.
    """
    if not isinstance(response, str):
        raise TypeError(f"a response must be a string, got {type(response).__name__}")
    if not response.strip():
        raise ValueError("empty response: there is nothing to score")
    msgs = messages(prompt, system_prompt)
    split = _template_split(tokenizer, msgs, response) if has_chat_template(tokenizer) else None
    if split is not None:
        ctx_text, content, base, tail = split
        ctx = tokenize(tokenizer, ctx_text)[0]
    else:
        content, base, tail = response, 0, None
        ctx = context_ids(tokenizer, msgs)
    resp, spans = tokenize(tokenizer, content, offsets=offsets)
    spans = [(a + base, b + base) for a, b in spans]
    end = []
    if tail:  # the template's tail up to its first end token
        t_ids = tokenize(tokenizer, tail)[0]
        cut = next((k for k, x in enumerate(t_ids) if x in set(end_ids)), None)
        end = t_ids[:cut + 1] if cut is not None else []
    if not terminated:
        end = []
    elif not end:
        end = [eos_id(tokenizer, end_ids)]
    n = len(response)
    return join_context(tokenizer, ctx, resp + end, end_ids=end_ids, max_length=max_length,
                        terminated=terminated,
                        offsets=spans + [(n, n)] * len(end) if offsets else [])


def join_context(tokenizer, ctx: Sequence[int], resp: Sequence[int], *, end_ids: Sequence[int],
                 max_length: int, terminated: bool = True,
                 offsets: Sequence[Tuple[int, int]] = ()) -> Encoded:
    """The `Encoded` of context ids `ctx` followed by response ids `resp` (its end token
    included): an empty context becomes the BOS token (else EOS), and a context longer than the
    room the response leaves in `max_length` is cut from the left (`n_cut` says by how much).

    Raises:
        ValueError: the response does not fit in max_length with one context token.
    """
    ctx, resp = list(ctx), list(resp)
    if not ctx:
        ctx = [int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                   else eos_id(tokenizer, end_ids))]
    if len(resp) + 1 > max_length:
        raise ValueError(f"the response has {len(resp)} tokens and does not fit in "
                         f"max_length={max_length} (with at least one context token)")
    keep = max_length - len(resp)
    return Encoded(ids=[int(x) for x in ctx[-keep:] + resp], n_resp=len(resp),
                   offsets=list(offsets), terminated=bool(terminated),
                   n_cut=max(0, len(ctx) - keep))


def pairs(prompts, responses) -> List[Tuple[Prompt, str]]:
    """(prompt, response) pairs from N prompts and N responses (one prompt, a string or a chat,
    is broadcast; one response string is a list of one); types and lengths checked."""
    if isinstance(responses, str):
        responses = [responses]
    if not isinstance(responses, (list, tuple)):
        raise TypeError(f"responses must be a string or a list of strings, got "
                        f"{type(responses).__name__}")
    is_chat = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and \
        all(isinstance(m, dict) for m in prompts)
    if isinstance(prompts, str) or is_chat:
        prompts = [prompts] * len(responses)
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a chat (list of message dicts) or a list of "
                        f"those, got {type(prompts).__name__}")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise TypeError(f"responses must be strings, got {type(r).__name__} at index {i}")
    return list(zip(prompts, responses))


def check_cut(encs: Sequence[Encoded], truncate: bool, max_length: int, *, what: str = "pair",
              stacklevel: int = 4) -> None:
    """After encoding a call's pairs: nothing if no context was cut; else one `TruncationWarning`
    (count and indices) or, with truncate=False, a ValueError naming the first."""
    cut = [i for i, e in enumerate(encs) if e.n_cut]
    if not cut:
        return
    if not truncate:
        raise ValueError(f"{len(cut)} prompt(s) do not fit in max_length={max_length} "
                         f"({what} {cut[0]} is {encs[cut[0]].n_cut} token(s) too long); "
                         "raise max_length or pass truncate=True to cut them from the left")
    worst = max(encs[i].n_cut for i in cut)
    warnings.warn(TruncationWarning(
        f"{len(cut)} of {len(encs)} prompt(s) cut from the left to fit max_length={max_length} "
        f"(up to {worst} tokens dropped; first: {what} {cut[0]})", cut), stacklevel=stacklevel)


# ------------------------------------------------------------------------------------ batches
def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, T) positions that count only attended tokens (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad(seqs: Sequence[Sequence[int]], pad_token: int, *,
        side: str = "right") -> Tuple[Tensor, Tensor, Tensor]:
    """Pad token-id lists to one (B, T) batch on the CPU.

    Returns:
        input_ids (B, T) int64, attention_mask (B, T) int64, position_ids (B, T) int64.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    b, t = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((b, t), int(pad_token), dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    for k, s in enumerate(seqs):
        o = t - len(s) if side == "left" else 0
        ids[k, o:o + len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[k, o:o + len(s)] = 1
    return ids, attn, position_ids(attn)


# ------------------------------------------------------------------------------------ forward
def plain_lm_head(model) -> Optional[torch.nn.Linear]:
    """The LM head when logits = hidden @ W.T (+ b) with nothing else (a model type of
    `PLAIN_HEAD_TYPES`, a Linear head, no logit scale or soft-capping, a decoder to get the hidden
    states from); else None."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return None
    head = model.get_output_embeddings()
    dec = getattr(model, "get_decoder", None)
    if not isinstance(head, torch.nn.Linear) or dec is None or dec() is None:
        return None
    return head


def supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass
class Window:
    """What the model gives for positions start..T−1: final hidden states (B, W, D) with the LM
    head's weight (V, D) and bias, when the head is plain; else the logits (B, W, V)."""

    hidden: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    logits: Optional[Tensor] = None


def window(model, input_ids: Tensor, attention_mask: Tensor, start: int, *,
           fused: bool = True) -> Window:
    """One forward of `model` over (B, T) ids, keeping positions start..T−1 (see `Window`).
    `fused=False` always returns logits."""
    pos = position_ids(attention_mask)
    head = plain_lm_head(model) if fused else None
    if head is not None:
        out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=pos, use_cache=False)
        return Window(hidden=out.last_hidden_state[:, start:], weight=head.weight, bias=head.bias)
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
              use_cache=False)
    if supports_logits_to_keep(model):
        kw["logits_to_keep"] = input_ids.shape[1] - start
    return Window(logits=model(**kw).logits[:, -(input_ids.shape[1] - start):])


def window_stats(win: Window, targets: Tensor, *, alpha: float, entropy: bool = False,
                 compute_dtype: Optional[torch.dtype] = None):
    """`erm.TokenStats` of (B, W) `targets` (IGNORE_INDEX where nothing is scored) over a window:
    the fused LM-head op on hidden states (cast to `compute_dtype` when given), else
    `erm.token_stats` on the logits. Differentiable when the forward was."""
    from .ops import linear_token_stats, token_stats

    if win.logits is not None:
        return token_stats(win.logits, targets, temperature=alpha, ignore_index=IGNORE_INDEX,
                           entropy=entropy)
    dt = compute_dtype if compute_dtype is not None else win.weight.dtype
    bias = win.bias.to(dt) if win.bias is not None else None
    return linear_token_stats(win.hidden.to(dt), win.weight.to(dt), targets, bias=bias,
                              temperature=alpha, ignore_index=IGNORE_INDEX, entropy=entropy)


def window_token_stats(model, input_ids: Tensor, attention_mask: Tensor, start: int,
                       targets: Tensor, *, alpha: float, entropy: bool = False,
                       compute_dtype: Optional[torch.dtype] = None, fused: bool = True):
    """`erm.TokenStats` of `targets` under `model` at positions start..T−1 (position t predicts
    the token after it), at temperature α: `window` then `window_stats`.

    Args:
        input_ids, attention_mask: (B, T) int64 on the model's device.
        start: first position of the window (0 ≤ start < T).
        targets: (B, T − start) int64, IGNORE_INDEX where nothing is scored.
        compute_dtype: dtype of the fused op's inputs (None: the LM head's).
        fused: False forces the logits path.
    Returns:
        TokenStats of (B, T − start) float32 tensors (entropy None unless asked).
    """
    win = window(model, input_ids, attention_mask, start, fused=fused)
    return window_stats(win, targets, alpha=alpha, entropy=entropy, compute_dtype=compute_dtype)


@dataclass
class WindowRewards:
    """The endogenous rewards of a batch's response tokens over the window start..T−1 of its
    positions (index j is position start + j; every tensor (B, T − start) float32, 0 outside
    `mask`).

    mask: the response tokens (bool). rewards: r_t = z_{t−1}[a_t] − γ·V(s_{t+1}) at each
    response token a_t, V = 0 after the last token of a terminated response, else the soft value
    of the next position. logprobs: log π_α(a_t | a_<t). values: the soft value V(s_t) =
    α·logsumexp(z_{t−1}/α) of the state before a_t.
    """

    start: int
    mask: Tensor
    rewards: Tensor
    logprobs: Tensor
    values: Tensor


def window_rewards(model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                   terminated, *, alpha: float, gamma: float = 1.0, start: Optional[int] = None,
                   compute_dtype: Optional[torch.dtype] = None,
                   fused: bool = True) -> WindowRewards:
    """Endogenous token rewards, log-probs and soft values of the response tokens of a batch from
    ONE forward over the window that starts at the state before the earliest response token
    (`window_token_stats`, then `erm.rewards_from_stats`): what `EndoRM` and the RL loop score.

    Args:
        input_ids, attention_mask: (B, T) int64 on the model's device (left or right padded).
        response_mask: (B, T) bools, True on the response tokens (never position 0).
        terminated: a bool or B bools (list / tensor): the response ended its turn (V = 0 after
            its last token) rather than being cut off (the soft value of the next position).
        alpha, gamma: temperature α and discount γ.
        start: first window position (at most the earliest response position − 1); None: that.
        compute_dtype, fused: as in `window_token_stats`.
    Returns:
        `WindowRewards` with (B, T − start) float32 tensors.
    Raises:
        ValueError: a mask of another shape, with no response token, marking position 0, or a
            `start` past the state before the earliest response token.
    """
    from .ops.endogenous import rewards_from_stats

    mask = torch.as_tensor(response_mask, device=input_ids.device).bool()
    if mask.shape != input_ids.shape or not bool(mask.any()):
        raise ValueError(f"response_mask must be (B, T) = {tuple(input_ids.shape)} with at least "
                         f"one response token, got shape {tuple(mask.shape)}")
    earliest = int(mask.float().argmax(1)[mask.any(1)].min())
    start = earliest - 1 if start is None else int(start)
    if earliest < 1 or not 0 <= start < earliest:
        raise ValueError(f"the window must start before the earliest response token (position "
                         f"{earliest}), got start={start}; position 0 has no preceding state")
    w_mask = mask[:, start:]
    prev = torch.cat([w_mask[:, 1:], torch.zeros_like(w_mask[:, :1])], 1)  # t−1 predicts a_t
    nxt = torch.cat([input_ids[:, start + 1:], input_ids.new_full((len(mask), 1), IGNORE_INDEX)],
                    1)
    targets = torch.where(prev, nxt, torch.full_like(nxt, IGNORE_INDEX))
    st = window_token_stats(model, input_ids, attention_mask, start, targets, alpha=alpha,
                            compute_dtype=compute_dtype, fused=fused)
    r = rewards_from_stats(st, w_mask, terminated, alpha=alpha, gamma=gamma).float()

    def at_tokens(x: Tensor) -> Tensor:  # index t−1 of the stats -> index t, 0 off the mask
        x = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        return torch.where(w_mask, x, torch.zeros_like(x))

    return WindowRewards(start=start, mask=w_mask, rewards=r,
                         logprobs=at_tokens(st.logprob.float()),
                         values=at_tokens(alpha * st.lse.float()))
