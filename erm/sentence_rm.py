"""`SentenceRM`: a trained sentence-level reward model (arXiv 2503.04793) on any causal LM.

A response is split into sentences with `erm.sentences.split_sentences`. Marker positions are
taken in the encoded conversation (`erm.lm.encode_pair`, the response as the assistant turn):

    end_0 = the last context token (the end of the prompt, just before the response)
    end_k = the last token of sentence k (the token holding its last character), k = 1..K

except that the template's end-of-turn token (`<|im_end|>` for ChatML; EOS without a template)
belongs to the last sentence: end_K is the final token of the sequence, so the last sentence's
reward includes closing the turn and the response-level baseline reads the value where a
classic reward model reads it. Sentences that end inside the same token (possible without
spaces, e.g. CJK) are merged into one.

A value head on the backbone's last hidden state gives v_t = w·h_t + b, and

    r_k = v(end_k) − v(end_{k−1})          sentence reward (Σ_k r_k = v(end_K) − v(end_0))

aggregated into the response reward R(x, y) by `aggregate`:

    "attention"  R = Σ_k softmax_k(q·k_k/√d)·r_k,  q = RoPE(W_q h(end_K), K−1),
                 k_k = RoPE(W_k h(end_k), k−1): one head, d = attn_dim (256), rotary position
                 over the sentence index, so the weights depend on how far a sentence is from the
                 last one
    "sum"        R = Σ_k r_k = v(end_K) − v(end_0)
    "last"       R = v(end_K), the value at the last token (response-level baseline)

Only the decoder body runs (`model.get_decoder()`): no (B, T, V) logits are computed; other
models fall back to `output_hidden_states`. Batches are right-padded (`erm.lm.pad`, position
ids counting attended tokens only) and give the scores of one pair at a time.

    rm = SentenceRM.from_backbone(None, aggregate="attention")   # embedded SmolLM2, random head
    rm, history = erm.train_sentence_rm(pairs, freeze_backbone=True, epochs=3)
    rm.score(["What is 2+2?"] * 2, ["4.", "5."])                  # tensor([...]) float32, (2,)
    rm.sentence_rewards("Explain.", "First. Second.")             # [SentenceScore, ...]
    rm.save_pretrained("srm"); SentenceRM.from_pretrained("srm")

Training: `erm.train_srm` (`erm.train_sentence_rm`, the `erm train-srm` command). The saved
files, how they are checked on loading and the backbone's weights fingerprint:
`erm.sentence_rm_io`.
"""
import bisect
import contextlib
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import lm, sentence_rm_io, srm_lora
from ._checks import check_int
from .lm import Prompt
from .loading import weights_fingerprint
from .scoring import in_batches
from .sentence_rm_io import (AGGREGATES, BACKBONE_DIR, CONFIG_NAME, FORMAT, HEAD_NAME,
                             VERSION, is_sentence_rm_dir, read_config, read_head, write_dir)
from .sentences import split_sentences

__all__ = ["SentenceRM", "SentenceScore", "SentenceHead", "sentence_markers",
           "is_sentence_rm_dir", "load_for_eval", "eval_mode", "AGGREGATES", "CONFIG_NAME",
           "HEAD_NAME", "read_config"]

_UNNAMED = object()  # a backbone given as an object: its weights are saved with the head


@dataclass
class SentenceScore:
    """One sentence of a response as a SentenceRM scores it.

    Attributes:
        text: the sentence, response[start:end].
        start, end: character span in the response (end exclusive); `span` is (start, end).
        reward: r_k = v(end_k) − v(end_{k−1}).
        weight: the coefficient of r_k in the response reward R: the attention weight
            (summing to 1 over the sentences) for "attention", 1.0 for "sum" and "last"
            ("last": R = v(end_0) + Σ_k r_k).
        value: v(end_k), the value head at the sentence's marker token.
        n_tokens: response tokens from the previous marker (exclusive) to this one (inclusive).
    """

    text: str
    start: int
    end: int
    reward: float
    weight: float
    value: float
    n_tokens: int

    @property
    def span(self) -> Tuple[int, int]:
        return (self.start, self.end)


def sentence_markers(response: str, offsets: Sequence[Tuple[int, int]],
                     ) -> Tuple[List[Tuple[int, int]], List[int]]:
    """Sentence spans and their marker tokens.

    Args:
        response: the response string.
        offsets: the character span of each response token (`erm.lm.encode_pair(...,
            offsets=True).offsets`: tokens the template adds after the content have empty spans
            at len(response)).
    Returns:
        (spans, ends): the sentence spans of `split_sentences` (sentences ending in the same
        token merged) and, per sentence, the index among the response tokens of its marker: the
        token holding its last character, the very last token for the last sentence.
    Raises:
        ValueError: a response with no sentences (empty or whitespace only) or no tokens.
    """
    spans = split_sentences(response)
    if not spans:
        raise ValueError("the response has no sentences (it is empty or whitespace only)")
    if not offsets:
        raise ValueError("the response has no tokens")
    # the last token starting at or before a character: tokens with a span, sorted by start,
    # with the running maximum of their indices (one bisect per sentence)
    by_start = sorted((a, i) for i, (a, b) in enumerate(offsets) if b > a)
    keys = [a for a, _ in by_start]
    last = list(itertools.accumulate((i for _, i in by_start), max))
    out_spans: List[Tuple[int, int]] = []
    ends: List[int] = []
    for k, (s, e) in enumerate(spans):
        if k == len(spans) - 1:
            idx = len(offsets) - 1
        else:
            j = bisect.bisect_right(keys, e - 1)
            idx = last[j - 1] if j else 0
        if ends and idx <= ends[-1]:  # ends in the token that ends the previous one: merge
            out_spans[-1] = (out_spans[-1][0], e)
            ends[-1] = max(ends[-1], idx)
            continue
        out_spans.append((s, e))
        ends.append(idx)
    return out_spans, ends


def _rotary(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """Rotary position embedding of (..., d) `x` at positions (...) (d even)."""
    half = x.shape[-1] // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[..., None] * inv
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class SentenceHead(nn.Module):
    """The trained part of a SentenceRM: the value head and the attention aggregator.

    Args:
        hidden_size: D of the backbone's hidden states.
        aggregate: "attention", "sum" or "last".
        attn_dim: d of the query/key projections ("attention" only; even).
        rope: rotary position over the sentence index on the query and keys.
        rope_base: the rotary frequency base.
    """

    def __init__(self, hidden_size: int, aggregate: str = "attention", attn_dim: int = 256,
                 rope: bool = True, rope_base: float = 10000.0):
        super().__init__()
        self.aggregate, self.attn_dim = aggregate, attn_dim
        self.rope, self.rope_base = bool(rope), float(rope_base)
        self.value = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.value.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.value.bias)
        if aggregate == "attention":
            self.query = nn.Linear(hidden_size, attn_dim, bias=False)
            self.key = nn.Linear(hidden_size, attn_dim, bias=False)

    def forward(self, states: Tensor, n: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Response rewards from marker states.

        Args:
            states: (B, M, D) hidden states at end_0..end_K (zero-padded beyond K_b + 1).
            n: (B,) int64 sentence counts K_b ≥ 1 (M ≥ max K_b + 1).
        Returns:
            (R (B,), r (B, M−1) sentence rewards, w (B, M−1) weights of r in R, v (B, M)
            values); entries beyond K_b are 0.
        """
        b, m, _ = states.shape
        states = states.float()
        v = self.value(states).squeeze(-1)  # (B, M)
        idx = torch.arange(m - 1, device=states.device)
        valid = idx[None, :] < n[:, None]  # sentence k+1 exists
        v = v * torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
        r = (v[:, 1:] - v[:, :-1]) * valid
        last_v = v.gather(1, n[:, None]).squeeze(1)
        if self.aggregate == "attention":
            last_h = states.gather(1, n[:, None, None].expand(b, 1, states.shape[-1]))
            q = self.query(last_h)  # (B, 1, d)
            keys = self.key(states[:, 1:])  # (B, M−1, d)
            if self.rope:
                q = _rotary(q, (n - 1)[:, None], self.rope_base)
                keys = _rotary(keys, idx[None, :].expand(b, -1), self.rope_base)
            logits = (q * keys).sum(-1) / math.sqrt(self.attn_dim)
            w = torch.softmax(logits.masked_fill(~valid, float("-inf")), -1)
            w = torch.where(valid, w, torch.zeros_like(w))
            return (w * r).sum(-1), r, w, v
        w = valid.to(r.dtype)
        if self.aggregate == "sum":
            return r.sum(-1), r, w, v
        return last_v, r, w, v


@dataclass
class _Example:
    """One encoded (prompt, response): token ids, marker positions end_0..end_K in `ids`, the
    sentence spans, and the context tokens cut to fit max_length."""

    ids: List[int]
    ends: List[int]
    spans: List[Tuple[int, int]]
    n_cut: int = 0


def _hidden_states(backbone, ids: Tensor, attn: Tensor, pos: Tensor) -> Tensor:
    """(B, T, D) last hidden states: the decoder body when the model has one (no logits),
    else the model with output_hidden_states."""
    get = getattr(backbone, "get_decoder", None)
    body = get() if get is not None else None
    if body is not None and body is not backbone:
        return body(input_ids=ids, attention_mask=attn, position_ids=pos,
                    use_cache=False).last_hidden_state
    out = backbone(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                   output_hidden_states=True)
    return out.hidden_states[-1]


class SentenceRM(nn.Module):
    """A sentence-level reward model: backbone + value head + aggregator (see the module doc).

    Args:
        backbone: a transformers causal LM (its decoder body gives the hidden states).
        tokenizer: its tokenizer; its chat template renders prompt and response.
        aggregate: "attention" (default), "sum" or "last".
        attn_dim: query/key dimension of the attention aggregator (even, default 256).
        rope: rotary position over the sentence index (default True).
        rope_base: rotary frequency base.
        system_prompt: system message put in every context (None: none).
        batch_size: sequences per forward in `score`.
        max_length: longest sequence (capped by the model's context); longer contexts are cut
            from the left with a `TruncationWarning`.
        backbone_name: how `save_pretrained` names the backbone: None for the embedded default,
            a local path or a cached model id; not given: the backbone's weights are saved.
        device, dtype: where / in what dtype to put the backbone (None: leave it); the head is
            float32 on the backbone's device.

    Attributes: `backbone`, `tokenizer`, `head` (`SentenceHead`), `aggregate`, `end_ids`,
    `backbone_name`, `backbone_fingerprint` (`erm.loading.weights_fingerprint` of the named
    backbone when it was loaded, None before a save computes it), `backbone_tuned` (True once
    the backbone was trained: then its weights are saved), `system_prompt`, `batch_size`,
    `max_length`; and those of the `erm.scoring.Scorer` protocol it implements (`kind`
    "sentence_rm", `label`, no `reductions`, `cuts_prompts`).
    """

    kind = "sentence_rm"
    reductions = ()
    cuts_prompts = True

    def __init__(self, backbone, tokenizer, *, aggregate: str = "attention", attn_dim: int = 256,
                 rope: bool = True, rope_base: float = 10000.0,
                 system_prompt: Optional[str] = None, batch_size: int = 8,
                 max_length: int = 2048, backbone_name=_UNNAMED, device=None, dtype=None):
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if check_int(attn_dim, "attn_dim", 2) % 2:
            raise ValueError(f"attn_dim must be even (rotary pairs), got {attn_dim}")
        check_int(batch_size, "batch_size", 1)
        check_int(max_length, "max_length", 2)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError("system_prompt must be a string or None")
        if not isinstance(backbone, nn.Module) or not hasattr(backbone, "config"):
            raise TypeError(f"backbone must be a transformers model, got "
                            f"{type(backbone).__name__}")
        self.backbone = lm.place(backbone, device, dtype).eval()
        self.tokenizer = tokenizer
        hidden = getattr(backbone.config, "hidden_size", None)
        if not isinstance(hidden, int):
            hidden = backbone.get_input_embeddings().weight.shape[1]
        dev = next(backbone.parameters()).device
        self.head = SentenceHead(hidden, aggregate, attn_dim, rope, rope_base).to(dev).eval()
        self.aggregate = aggregate
        self.system_prompt, self.batch_size = system_prompt, batch_size
        self.max_length = lm.cap_length(backbone, max_length)
        self.end_ids = lm.end_token_ids(backbone, tokenizer)
        self.backbone_name = backbone_name
        self.backbone_fingerprint: Optional[dict] = None
        self.backbone_tuned = False
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def label(self) -> str:
        """How reports name it: "SentenceRM (<aggregate>)"."""
        return f"SentenceRM ({self.aggregate})"

    @property
    def causal_lm(self):
        """The causal LM whose hidden states score (`backbone`)."""
        return self.backbone

    def __repr__(self) -> str:
        name = self.backbone_name if self.backbone_name is not _UNNAMED else \
            getattr(self.backbone.config, "_name_or_path", type(self.backbone).__name__)
        return (f"SentenceRM({name or 'embedded default'!r}, aggregate={self.aggregate!r}, "
                f"device={self.device})")

    @classmethod
    def from_backbone(cls, name_or_path: Optional[str] = None, *, device=None, dtype=None,
                      **kwargs) -> "SentenceRM":
        """A SentenceRM with a fresh (untrained) head on a causal LM loaded from local files
        (`erm.lm.load`: None is the embedded default model). Other arguments as in the class."""
        dev, dt = lm.device_and_dtype(device, dtype)
        found = weights_fingerprint(name_or_path)
        model, tok = lm.load(name_or_path, dt)
        rm = cls(model, tok, backbone_name=_backbone_name(name_or_path), device=dev, **kwargs)
        rm.backbone_fingerprint = found if found.get("files") is not None else None
        return rm

    # ------------------------------------------------------------------ encoding
    def encode(self, prompt: Prompt, response: str, *,
               system_prompt: Optional[str] = None) -> _Example:
        """Token ids and marker positions of one pair (`system_prompt=None`: the model's own,
        "": none). Raises TypeError / ValueError for a bad prompt, an empty response or one
        without sentences, or one that does not fit in max_length."""
        sp = self.system_prompt if system_prompt is None else system_prompt
        enc = lm.encode_pair(self.tokenizer, prompt, response, end_ids=self.end_ids,
                             max_length=self.max_length, system_prompt=sp, offsets=True)
        spans, ends = sentence_markers(response, enc.offsets)
        n_ctx = len(enc.ids) - enc.n_resp
        return _Example(ids=enc.ids, ends=[n_ctx - 1] + [n_ctx + i for i in ends],
                        spans=spans, n_cut=enc.n_cut)

    def encode_many(self, prompts, responses, *, system_prompt: Optional[str] = None,
                    truncate: bool = True, what: str = "pair") -> List[_Example]:
        """`encode` for lists (one prompt broadcast), errors naming the pair index; a cut
        context warns once (`TruncationWarning`) or, with truncate=False, raises."""
        out = []
        for i, (p, r) in enumerate(lm.pairs(prompts, responses)):
            try:
                out.append(self.encode(p, r, system_prompt=system_prompt))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{what} {i}: {exc}") from None
        lm.check_cut(out, truncate, self.max_length, what=what)
        return out

    def check_pair(self, prompt: Prompt, response: str, *, system_prompt: Optional[str] = None,
                   truncate: bool = True) -> None:
        """Raise the TypeError / ValueError `score` would raise for this pair, without running
        the model (a malformed prompt, an empty response or one without sentences, one that
        does not fit, a cut context with truncate=False)."""
        self.encode_many([prompt], [response], system_prompt=system_prompt, truncate=truncate)

    # ------------------------------------------------------------------ forward
    def marker_states(self, examples: Sequence[_Example]) -> List[Tensor]:
        """One backbone forward over a right-padded batch: per example the (K+1, D) hidden
        states at its markers (differentiable when grad is enabled; the backbone's dtype)."""
        ids, attn, pos = lm.pad([e.ids for e in examples],
                                lm.pad_id(self.tokenizer, self.end_ids), side="right")
        dev = next(self.backbone.parameters()).device
        h = _hidden_states(self.backbone, ids.to(dev), attn.to(dev), pos.to(dev))
        return [h[b, torch.tensor(e.ends, device=dev)] for b, e in enumerate(examples)]

    def aggregate_states(self, states: Sequence[Tensor]):
        """`SentenceHead` over a list of (K_b+1, D) marker states: (R, r, w, v) as there."""
        n = torch.tensor([s.shape[0] - 1 for s in states], device=self.device)
        packed = nn.utils.rnn.pad_sequence([s.to(self.device).float() for s in states],
                                           batch_first=True)
        return self.head(packed, n)

    def forward(self, examples: Sequence[_Example]) -> Tensor:
        """(B,) response rewards R of encoded examples (one backbone forward; differentiable)."""
        return self.aggregate_states(self.marker_states(examples))[0]

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def score(self, prompts: Union[Prompt, Sequence[Prompt]],
              responses: Union[str, Sequence[str]], *, system_prompt: Optional[str] = None,
              progress: Optional[bool] = None, truncate: bool = True) -> Tensor:
        """Response reward R(x, y) of each (prompt, response) pair.

        Args:
            prompts: N prompts (strings or chat message lists), or one broadcast to all.
            responses: N response strings (or one).
            system_prompt: None: `self.system_prompt`; "": none.
            progress: a tqdm bar (None: when there is more than one batch).
            truncate: False raises instead of cutting a long context from the left.
        Returns:
            (N,) float32 CPU tensor in input order.
        Raises:
            TypeError / ValueError: wrong types, mismatched lengths, an empty response or one
                with no sentences (naming the pair index).
        """
        examples = self.encode_many(prompts, responses, system_prompt=system_prompt,
                                    truncate=truncate)
        return self.score_examples(examples, progress=progress)

    @torch.inference_mode()
    def score_examples(self, examples: Sequence[_Example], *,
                       progress: Optional[bool] = None) -> Tensor:
        """(N,) float32 CPU rewards of encoded examples, in length-sorted batches."""
        with eval_mode(self):
            out = in_batches([len(e.ids) for e in examples], self.batch_size,
                             lambda idx: self.forward([examples[i] for i in idx]).float().cpu(),
                             progress=progress)
        return torch.stack(out) if out else torch.empty(0, dtype=torch.float32)

    @torch.inference_mode()
    def sentence_rewards(self, prompt: Prompt, response: str, *,
                         system_prompt: Optional[str] = None) -> List[SentenceScore]:
        """The sentences of one response with their rewards r_k, weights in R and values.

        Σ_k weight_k·reward_k is `score(prompt, response)` for "attention" and "sum" (for
        "last" add the value v(end_0) at the end of the prompt)."""
        ex = self.encode_many([prompt], [response], system_prompt=system_prompt)[0]
        with eval_mode(self):
            _, r, w, v = self.aggregate_states(self.marker_states([ex]))
        r, w, v = r[0].tolist(), w[0].tolist(), v[0].tolist()
        return [SentenceScore(text=response[s:e], start=s, end=e, reward=r[k], weight=w[k],
                              value=v[k + 1], n_tokens=ex.ends[k + 1] - ex.ends[k])
                for k, (s, e) in enumerate(ex.spans)]

    # ------------------------------------------------------------------ saving
    def config(self) -> dict:
        """The JSON config `save_pretrained` writes (without the backbone entry)."""
        return {"format": FORMAT, "version": VERSION, "aggregate": self.aggregate,
                "attn_dim": self.head.attn_dim, "rope": self.head.rope,
                "rope_base": self.head.rope_base, "hidden_size": self.head.value.in_features,
                "system_prompt": self.system_prompt, "batch_size": self.batch_size,
                "max_length": self.max_length}

    def save_pretrained(self, path) -> Path:
        """Write `sentence_rm.json` and `head.safetensors` (value head + aggregator) to `path`
        (`erm.sentence_rm_io.write_dir`); the backbone too (`backbone/`, a causal LM directory
        with its tokenizer) when it was trained or has no name, else the config names it (a
        local path, a cached model id, or null for the embedded default) with the
        `erm.loading.weights_fingerprint` of its weights, which `from_pretrained` compares;
        LoRA adapters on a named base go to `adapter/` (`erm.srm_lora`), which
        `from_pretrained` merges into the base again. Returns the directory."""
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a directory")
        cfg = self.config()
        named = self.backbone_name is not _UNNAMED
        adapter = named and srm_lora.is_adapted(self.backbone)  # LoRA on a named base
        save_backbone = (self.backbone_tuned or not named) and not adapter
        if save_backbone:
            srm_lora.merged(self.backbone).save_pretrained(out / BACKBONE_DIR)
            self.tokenizer.save_pretrained(out / BACKBONE_DIR)
        if adapter:
            srm_lora.save_adapter(self.backbone, out / srm_lora.ADAPTER_DIR)
        if named and self.backbone_fingerprint is None:
            found = weights_fingerprint(self.backbone_name)
            self.backbone_fingerprint = found if found.get("files") is not None else None
        cfg.update(backbone=BACKBONE_DIR if save_backbone else self.backbone_name,
                   backbone_saved=save_backbone, base_model=self.backbone_name if named else None,
                   base_model_named=named, backbone_tuned=bool(self.backbone_tuned),
                   base_model_fingerprint=self.backbone_fingerprint if named else None,
                   adapter=srm_lora.ADAPTER_DIR if adapter else None)
        return write_dir(out, cfg, self.head.state_dict())

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, check_backbone: bool = True,
                        **overrides) -> "SentenceRM":
        """Load a directory written by `save_pretrained` (its backbone from `backbone/` or from
        where the config names it); JSON and safetensors only, never pickle.

        Args:
            path: the directory.
            device, dtype: where and in what dtype to put the backbone.
            check_backbone: True (default): refuse a named backbone whose weights differ from
                those the head was saved with (`erm.loading.weights_fingerprint`: weights
                replaced at the same path); False: load anyway, with a warning naming what
                differs.
            overrides: system_prompt, batch_size, max_length.
        Raises:
            FileNotFoundError: no such directory / no sentence_rm.json or head.safetensors.
            ValueError (naming the file): a config that is not valid JSON, of another format,
                of a version this erm does not know, or with a bad field; a head that is not a
                readable safetensors file, holds NaN / inf or does not match the config or the
                backbone; a named backbone whose weights changed (unless check_backbone=False).
        """
        cfg = read_config(path)
        found = sentence_rm_io.check_backbone(path, cfg, check_backbone)
        state = read_head(path, cfg)
        name = str(Path(path) / BACKBONE_DIR) if cfg.get("backbone_saved") else cfg["backbone"]
        dev, dt = lm.device_and_dtype(device, dtype)
        model, tok = lm.load(name, dt)
        if cfg.get("adapter") is not None:  # LoRA adapters saved beside the head
            model = srm_lora.load_adapter(model, Path(path) / srm_lora.ADAPTER_DIR)
        kw = {k: cfg[k] for k in ("system_prompt", "batch_size", "max_length") if k in cfg}
        kw.update(overrides)
        rm = cls(model, tok, aggregate=cfg["aggregate"], attn_dim=cfg["attn_dim"],
                 rope=cfg["rope"], rope_base=cfg["rope_base"], device=dev,
                 backbone_name=cfg["base_model"] if cfg.get("base_model_named") else _UNNAMED,
                 **kw)
        rm.backbone_tuned = bool(cfg.get("backbone_tuned"))
        rm.backbone_fingerprint = found if found is not None else \
            cfg.get("base_model_fingerprint")
        try:
            rm.head.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{Path(path) / HEAD_NAME}: the head weights do not match the "
                             f"config and the backbone: {exc}") from None
        return rm


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Every submodule of `module` in eval mode inside the block, each one's own mode (training
    or eval) restored after, whatever it was; yields `module`."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _backbone_name(name_or_path: Optional[str]) -> Optional[str]:
    """How a config names a backbone loaded by `erm.lm.load(name_or_path)`: None (embedded
    default), an absolute local path, or the model id as given."""
    if name_or_path is None:
        return None
    path = os.path.expanduser(str(name_or_path))
    return os.path.abspath(path) if os.path.exists(path) else str(name_or_path)


def load_for_eval(path, *, device=None, dtype=None, srm_overrides: Optional[dict] = None,
                  check_backbone: bool = True, **endorm_kwargs):
    """(EndoRM, SentenceRM) to compare in one `erm.evaluate.evaluate` table: the SentenceRM
    saved in `path` and the training-free EndoRM of its base model — sharing the backbone when
    it was not trained (one model in memory), else loaded from where the config names the base
    model. `endorm_kwargs` go to EndoRM (system_prompt, batch_size, max_length, ...),
    `srm_overrides` to `SentenceRM.from_pretrained` (system_prompt, batch_size, max_length).
    The EndoRM is None when the base model cannot be named (a backbone given as an object).
    `check_backbone` as in `SentenceRM.from_pretrained`, for the base model too: a ValueError
    when its weights changed since the SentenceRM was saved."""
    from .model import EndoRM

    srm = SentenceRM.from_pretrained(path, device=device, dtype=dtype,
                                     check_backbone=check_backbone, **(srm_overrides or {}))
    if not srm.backbone_tuned:
        return EndoRM(srm.backbone, srm.tokenizer, **endorm_kwargs), srm
    if srm.backbone_name is _UNNAMED:
        return None, srm
    sentence_rm_io.check_backbone(path, read_config(path), check_backbone, base=True)
    return EndoRM.from_pretrained(srm.backbone_name, device=device, dtype=dtype,
                                  **endorm_kwargs), srm
