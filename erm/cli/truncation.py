"""Scoring with the input's file and line in every error: pairs checked before scoring, and the
prompts a model cut to fit max_length (its `erm.lm.TruncationWarning`s) reported per line, or
an error with --no-truncate."""
import warnings
from typing import List

from ..lm import TruncationWarning
from ..scoring import truncate_option
from .options import CLIError, warn

NO_FIT = ("the prompt does not fit in max_length with its response (--no-truncate); raise "
          "--max-length or shorten the prompt")


def _show(caught) -> None:
    """Show the recorded warnings that are not truncation warnings, as Python would have."""
    for w in caught:
        if not isinstance(w.message, TruncationWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def check_pairs(rm, items, *, system_prompt=None, no_truncate=False) -> None:
    """Before scoring: `rm.check_pair` (an `erm.scoring.Scorer`) on every (where, prompt,
    response) item, its error prefixed with the item's file and line; with `no_truncate`, a pair
    whose prompt would be cut (a truncation warning) is an error too."""
    options = truncate_option(rm, True)
    with warnings.catch_warnings(record=True) as caught:  # scoring reports truncation once
        warnings.simplefilter("always")
        for where, prompt, response in items:
            n = len(caught)
            try:
                rm.check_pair(prompt, response, system_prompt=system_prompt, **options)
            except (ValueError, TypeError) as exc:
                raise CLIError(f"{where}: {exc}") from None
            if no_truncate and any(isinstance(w.message, TruncationWarning)
                                   for w in caught[n:]):
                raise CLIError(f"{where}: {NO_FIT}")
    _show(caught)


def run_scoring(fn, wheres: List[str], source: str):
    """fn() with its warnings recorded -> (result, sorted indices of truncated prompts).

    The indices of every `erm.lm.TruncationWarning` are collected; other warnings are shown as
    usual. A ValueError becomes a CLIError naming the lines of the pairs it carries in
    `indices`, else the data file `source`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except ValueError as exc:
            idx = [i for i in getattr(exc, "indices", None) or [] if 0 <= i < len(wheres)]
            raise CLIError(f"{wheres[idx[0]] if idx else source}: {exc}") from None
    truncated = {int(i) for w in caught if isinstance(w.message, TruncationWarning)
                 for i in w.message.indices}
    _show(caught)
    return result, sorted(truncated)


def truncation_note(args, wheres: List[str], truncated: List[int], what="prompt") -> str:
    """-v: one warning per truncated row; --no-truncate: an error naming them; returns the text
    for the summary line ("" when nothing was cut)."""
    if not truncated:
        return ""
    rows = list(dict.fromkeys(wheres[i] for i in truncated if 0 <= i < len(wheres)))
    if getattr(args, "no_truncate", False):
        more = f" (and {len(rows) - 3} more)" if len(rows) > 3 else ""
        raise CLIError(f"{'; '.join(rows[:3])}{more}: {NO_FIT}")
    verbose = getattr(args, "verbose", False)
    if verbose:
        for w in rows:
            warn(f"{w}: {what} truncated from the left to fit max_length")
    note = f"{len(rows)} {what}(s) truncated from the left to fit max_length"
    hint = "" if verbose else " (-v lists them)"
    if getattr(args, "quiet", False):
        warn(note + hint)
    return f"; {note}{hint}"
