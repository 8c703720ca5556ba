"""What erm's scorers share: the `Scorer` protocol that `erm.EndoRM`, `erm.SentenceRM` and the
Yes/No `erm.judge.Judge` implement, so a caller scores with any of them without asking which it
is, and the helpers their scoring loops share.

    scorer.score(prompts, responses, progress=False, **truncate_option(scorer, truncate))
    one_reward(scorer)                           # True: no reductions (a SentenceRM)
    scorer.check_pair(prompt, response)          # the error `score` would raise, no forward
    scorer.kind, scorer.label                    # "endorm", "EndoRM"; "sentence_rm", ...

    results = in_batches(lengths, batch_size, run)   # length-sorted batches, input order back
    sums, n_tokens = response_sums(per_token_rewards) # Σ_t r_t in float64, stored as float32
    flags = terminated_flags(terminated, n)           # one bool or n bools -> n bools
"""
from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor

from . import lm

#: The kinds of scorer erm has (`Scorer.kind`).
KINDS = ("endorm", "sentence_rm", "judge")


@runtime_checkable
class Scorer(Protocol):
    """A reward model that scores (prompt, response) pairs.

    Attributes:
        kind: "endorm", "sentence_rm" or "judge" (`KINDS`).
        label: how reports name it: "EndoRM", "SentenceRM (attention)", "Judge (Yes/No)".
        reductions: the values `score(reduction=...)` takes ("sum", "mean" for an EndoRM); ()
            when the scorer has one response reward and `score` takes no `reduction`.
        cuts_prompts: whether a context too long for `max_length` is cut from the left (with an
            `erm.lm.TruncationWarning`), so `score` and `check_pair` take `truncate` (False: an
            error instead of a cut). A scorer that never cuts takes no `truncate`.
        batch_size: pairs per forward pass of `score`.
        max_length: the longest sequence it scores (None: no limit).
        system_prompt: the default system message (None: none).
        tokenizer: the tokenizer of `causal_lm`.
        causal_lm: the causal LM whose weights score (EndoRM.model, SentenceRM.backbone).
    """

    kind: str
    label: str
    reductions: Tuple[str, ...]
    cuts_prompts: bool
    batch_size: int
    max_length: Optional[int]
    system_prompt: Optional[str]
    tokenizer: Any

    @property
    def causal_lm(self) -> Any:
        ...

    def score(self, prompts, responses, *, system_prompt: Optional[str] = None,
              progress: Optional[bool] = None, **options) -> Tensor:
        """(N,) float32 CPU rewards of N (prompt, response) pairs (one prompt broadcast);
        `options`: `truncate` when `cuts_prompts`, `reduction` one of `reductions`."""
        ...

    def check_pair(self, prompt, response: str, *, system_prompt: Optional[str] = None,
                   **options) -> None:
        """Raise the TypeError / ValueError `score` would raise for this pair, without running
        the model (`options`: `truncate` when `cuts_prompts`)."""
        ...


def truncate_option(scorer, truncate: bool) -> dict:
    """The keyword arguments that pass `truncate` to `scorer.score` / `check_pair` /
    `response_rewards`: for a `Scorer`, ``{"truncate": truncate}`` when it cuts prompts
    (`cuts_prompts`) and ``{}`` when it never does (nothing to refuse); a model outside the
    protocol (any object with those methods) is passed ``truncate=False`` only, so one without
    the argument works as long as cutting is allowed.
    """
    if isinstance(scorer, Scorer):
        return {"truncate": bool(truncate)} if scorer.cuts_prompts else {}
    return {} if truncate else {"truncate": False}


def one_reward(scorer) -> bool:
    """Whether `scorer` is a `Scorer` with one response reward (no `reductions`: its `score`
    takes no `reduction`, and it has no `response_rewards`), as an `erm.SentenceRM`; False for
    an `erm.EndoRM` and for a model outside the protocol (an object with `response_rewards`)."""
    return isinstance(scorer, Scorer) and not scorer.reductions


def in_batches(lengths: Sequence[int], batch_size: int,
               run: Callable[[List[int]], Optional[Sequence]], *,
               progress: Optional[bool] = None, desc: str = "scoring") -> list:
    """The batched scoring loop: `run(idx)` on the indices of `lengths` in length-sorted batches
    of at most `batch_size` (`erm.lm.length_batches`), with a tqdm bar counting items.

    Args:
        lengths: N sequence lengths (token counts).
        batch_size: most items per call of `run`.
        run: called with a batch's indices (a list); returns one result per index, in that
            order, or None (results kept elsewhere).
        progress: show the bar (None: when there is more than one batch).
        desc: the bar's label.
    Returns:
        the N results in input order (None where `run` returned None).
    """
    out: list = [None] * len(lengths)
    batches = lm.length_batches(lengths, batch_size)
    show = progress if progress is not None else len(batches) > 1
    from tqdm.auto import tqdm

    with tqdm(total=len(lengths), desc=desc, unit="pair", leave=False, disable=not show) as bar:
        for idx in batches:
            results = run(idx)
            if results is not None:
                for i, r in zip(idx, results):
                    out[i] = r
            bar.update(len(idx))
    return out


def response_sums(per_token: Sequence[Optional[Tensor]]) -> Tuple[Tensor, Tensor]:
    """Σ_t r_t (accumulated in float64, stored as float32) and the number of tokens of each
    response's (n_k,) reward tensor (None: an empty response, 0 and 0).

    Returns:
        (sums (N,) float32, n_tokens (N,) int64), CPU tensors.
    """
    sums = torch.tensor([float(r.sum(dtype=torch.float64)) if r is not None else 0.0
                         for r in per_token], dtype=torch.float32)
    lengths = torch.tensor([r.numel() if r is not None else 0 for r in per_token],
                           dtype=torch.int64)
    return sums, lengths


def terminated_flags(terminated, n: int) -> List[bool]:
    """`terminated` as n bools: one bool broadcast, or a sequence / array / tensor of n bools
    (0/1 integers too).

    Raises:
        TypeError: not a bool or a sequence, or an entry that is not a bool.
        ValueError: a sequence of another length than n.
    """
    if isinstance(terminated, bool):
        return [terminated] * n
    if hasattr(terminated, "tolist"):
        terminated = terminated.tolist()
    if not isinstance(terminated, (list, tuple)):
        raise TypeError(f"terminated must be a bool or a sequence of bools, got "
                        f"{type(terminated).__name__}")
    if len(terminated) != n:
        raise ValueError(f"terminated has {len(terminated)} entries for {n} pairs")
    for x in terminated:
        if not isinstance(x, (bool, int)) or x not in (0, 1):
            raise TypeError(f"terminated must hold bools, got {x!r}")
    return [bool(x) for x in terminated]
