"""Best-of-N selection with verified answers: among N candidate responses to a prompt, is the one
a reward model scores highest correct?

    from erm import best_of_n
    items = best_of_n.load(best_of_n.default_data_path())   # the built-in arithmetic file
    rep = best_of_n.evaluate(rm, items, methods=("endorm_sum", "endorm_mean", "length"))
    print(best_of_n.format_table(rep))
    best_of_n.plot_curves(rep, "bon.png")                   # pass@1 vs best-of-k, k = 1..N
    best_of_n.select(rm, prompt, candidates)                # [(index, score)], best first

Format (JSONL, plain or gzip, or a local Parquet file; one record a prompt)::

    {"prompt": "...", "responses": [N strings], "correct": [N bools],
     "answers": [N final answers]?, "subset": "..."?}

N ≥ 2 and may differ between records. The numbers, per method and per subset:

- top-1 accuracy: whether the best-scored response is correct; when t responses tie at the best
  score and c of them are correct, the record counts c/t (a random pick among the tied). A NaN
  score ranks below every number.
- random: the expected accuracy of a uniformly random pick, the share of correct responses
  (pass@1).
- oracle: whether any response is correct (pass@N).
- majority vote (when every record carries `answers`): the most frequent final answer (answers
  compared as stripped strings, null answers do not vote); ties between answers split like
  ties between scores; an answer counts as correct by the share of its responses marked correct.
- best-of-k curves, k = 1..max N: the top-1 accuracy among k responses drawn without replacement
  (every k-subset when there are at most `draws` of them, else `draws` random ones, seeded by
  `seed`, the record and k); a record with fewer than k responses uses all of them. Beside them,
  pass@k (any correct among k, exact: 1 − C(N−c, k) / C(N, k)).
"""
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Union

from .data import DEFAULT_SUBSET, DataError, parse_records, read_records, record_prompt

__all__ = ["BonItem", "default_data_path", "is_record", "load", "try_load", "select", "top1",
           "majority", "subset_top1", "pass_at_k", "score", "report", "evaluate",
           "format_table", "plot_curves"]

#: Most k-subsets drawn per record and k for the best-of-k curves.
DRAWS = 64


@dataclass(frozen=True)
class BonItem:
    """One prompt with N candidate responses, their correctness and (optionally) final answers."""

    prompt: Union[str, list]
    responses: List[str]
    correct: List[bool]
    answers: Optional[list] = None
    subset: str = DEFAULT_SUBSET
    where: str = field(default="", compare=False, repr=False)


def default_data_path():
    """The built-in demonstration file: arithmetic questions, each with candidate solutions
    checked by `dev/make_bon_demo.py` (a `Traversable`, usable as a path by `open`)."""
    return resources.files("erm").joinpath("data", "best_of_n.jsonl")


# ------------------------------------------------------------------------------------- reading
def is_record(rec) -> bool:
    """Whether `rec` looks like a best-of-N record: an object with `responses` and `correct`."""
    return isinstance(rec, dict) and "responses" in rec and "correct" in rec


def _item(rec, where: str) -> BonItem:
    """One record checked and parsed (a ValueError says what is wrong, not where)."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("prompt", "responses", "correct") if k not in rec]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    prompt = record_prompt(rec["prompt"])
    responses, correct = rec["responses"], rec["correct"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError("'responses' must be a list of at least 2 responses")
    for k, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"'responses'[{k}] must be a non-empty string")
    if not isinstance(correct, list) or len(correct) != len(responses):
        raise ValueError(f"'correct' must be a list of {len(responses)} bools (one per "
                         "response)")
    if not all(isinstance(c, bool) for c in correct):
        raise ValueError("'correct' must hold true/false values")
    answers = rec.get("answers")
    if answers is not None:
        if not isinstance(answers, list) or len(answers) != len(responses):
            raise ValueError(f"'answers' must be a list of {len(responses)} final answers")
        if not all(a is None or isinstance(a, (str, int, float)) for a in answers):
            raise ValueError("'answers' must hold strings, numbers or null")
    subset = rec.get("subset", DEFAULT_SUBSET)
    if not isinstance(subset, str) or not subset:
        raise ValueError("'subset' must be a non-empty string")
    return BonItem(prompt, list(responses), list(correct), answers, subset, where)


def _parse(records, source: str) -> List[BonItem]:
    items = parse_records(records, _item, source)
    with_answers = sum(it.answers is not None for it in items)
    if 0 < with_answers < len(items):
        first = next(it for it in items if it.answers is None)
        raise DataError(f"{first.where}: no 'answers' while other records have them (majority "
                        "vote needs them on every record)")
    return items


def load(path) -> List[BonItem]:
    """Read a best-of-N file (JSONL, plain or gzip, or a local Parquet file).

    Raises:
        FileNotFoundError: no such file.
        DataError: a malformed record (naming the file and line / row): a missing field, fewer
            than 2 responses, `correct` / `answers` of another length than `responses`.
    """
    return _parse(read_records(path), str(path))


def try_load(path) -> Optional[List[BonItem]]:
    """`load`'s items when the first record of `path` is a best-of-N record, else None (also
    for a file that cannot be read).

    Raises:
        DataError: a best-of-N file with a malformed record."""
    try:
        records = list(read_records(path, limit=1))
    except (OSError, ValueError):
        return None
    if not records or not is_record(records[0][1]):
        return None
    return load(path)


# ----------------------------------------------------------------------------------- numbers
def _key(x: float) -> float:
    return x if not math.isnan(x) else -math.inf


def top1(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """c/t: the share of correct responses among the t tied at the best score (NaN lowest)."""
    keys = [_key(s) for s in scores]
    best = max(keys)
    tied = [c for k, c in zip(keys, correct) if k == best]
    return sum(tied) / len(tied)


def majority(answers: Sequence, correct: Sequence[bool]) -> float:
    """Majority-vote accuracy of one record: the most frequent answer (stripped strings; None
    does not vote), ties split, each answer correct by the share of its responses marked
    correct; 0 when no response has an answer."""
    groups: Dict[str, List[bool]] = {}
    for a, c in zip(answers, correct):
        if a is not None:
            groups.setdefault(str(a).strip(), []).append(c)
    if not groups:
        return 0.0
    most = max(len(g) for g in groups.values())
    top = [g for g in groups.values() if len(g) == most]
    return sum(sum(g) / len(g) for g in top) / len(top)


def subset_top1(scores: Sequence[float], correct: Sequence[bool], k: int, *, draws: int = DRAWS,
                rng: Optional[random.Random] = None) -> float:
    """The mean `top1` over k-subsets of the responses: all of them when there are at most
    `draws`, else `draws` drawn with `rng` (k ≥ N: all responses)."""
    n = len(scores)
    if k >= n:
        return top1(scores, correct)
    if math.comb(n, k) <= draws:
        subsets = list(combinations(range(n), k))
    else:
        rng = rng or random.Random(0)
        subsets = [rng.sample(range(n), k) for _ in range(draws)]
    wins = [top1([scores[i] for i in s], [correct[i] for i in s]) for s in subsets]
    return sum(wins) / len(wins)


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k responses drawn without replacement from n, c correct, is correct);
    k ≥ n: whether c > 0."""
    if k >= n:
        return float(c > 0)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def select(selector, prompt, candidates: Sequence[str], *, reduction: str = "sum",
           system_prompt: Optional[str] = None) -> list:
    """Rank candidates with a reward model: `selector.best_of_n` (an `erm.EndoRM`, with
    `reduction`) or, for a scorer with one response reward (an `erm.SentenceRM`), its `score`.

    Returns:
        [(index into candidates, score as float)], best first (ties keep input order).
    """
    from .scoring import one_reward
    if isinstance(candidates, str) or not len(candidates):
        raise ValueError("candidates must be a non-empty list of strings")
    if not one_reward(selector) and hasattr(selector, "best_of_n"):
        return selector.best_of_n(prompt, list(candidates), reduction=reduction,
                                  system_prompt=system_prompt, progress=False)
    s = selector.score(prompt, list(candidates), system_prompt=system_prompt,
                       progress=False).tolist()
    return sorted(enumerate(s), key=lambda t: -_key(t[1]))


# ----------------------------------------------------------------------------------- scoring
def score(rm, items: Sequence[BonItem], *, methods: Sequence[str] = ("endorm_sum",),
          **options) -> Dict[str, tuple]:
    """Every method's scores of every response, one batched call per method
    (`erm.evaluate.score_methods`; `options`: its srm, system_prompt, progress, batch_size,
    truncate).

    Returns:
        {method: (per item a list of N float scores, seconds)}.
    """
    from .evaluate import score_methods
    prompts = [it.prompt for it in items for _ in it.responses]
    responses = [r for it in items for r in it.responses]
    out = {}
    for m, (flat, seconds) in score_methods(rm, methods, prompts, responses, **options).items():
        rows, k = [], 0
        for it in items:
            rows.append(flat[k:k + len(it.responses)])
            k += len(it.responses)
        out[m] = (rows, seconds)
    return out


def _by_subset(values: Sequence[float], subsets: Sequence[str], counts: Dict[str, int]) -> dict:
    return {s: sum(v for v, x in zip(values, subsets) if x == s) / c for s, c in counts.items()}


def _curves(items: Sequence[BonItem], scores: Dict[str, tuple], seed: int, draws: int) -> dict:
    """Best-of-k top-1 accuracy per method and pass@k, k = 1..max N."""
    ks = list(range(1, max(len(it.responses) for it in items) + 1))
    out = {"k": ks, "pass@k": [sum(pass_at_k(len(it.correct), sum(it.correct), k)
                                   for it in items) / len(items) for k in ks], "methods": {}}
    for m, (rows, _) in scores.items():
        out["methods"][m] = [
            sum(subset_top1(sc, it.correct, k, draws=draws,
                            rng=random.Random(seed * 1_000_003 + idx * 1_009 + k))
                for idx, (it, sc) in enumerate(zip(items, rows))) / len(items) for k in ks]
    return out


def report(items: Sequence[BonItem], scores: Dict[str, tuple], *, seed: int = 0,
           draws: int = DRAWS, labels: Optional[Dict[str, str]] = None) -> dict:
    """The best-of-N report of `score`'s scores::

        {"protocol": "best_of_n", "n": 40, "responses": 240, "subsets": {"add": 10, ...},
         "methods": {"endorm_sum": {"label", "top1", "subsets": {...}, "ties", "seconds"}},
         "baselines": {"random": {"top1", "subsets"}, "oracle": {...}, "majority": {...}?},
         "curves": {"k": [1..N], "methods": {m: [...]}, "pass@k": [...]},
         "items": [{"index", "subset", "correct", "scores": {m: [...]}, "top1": {m: ..}}]}

    `ties`: records whose best score is shared by several responses."""
    from .evaluate import method_label, subset_counts
    subsets = [it.subset for it in items]
    counts = subset_counts(subsets)
    base = {"random": [sum(it.correct) / len(it.correct) for it in items],
            "oracle": [float(any(it.correct)) for it in items]}
    if items[0].answers is not None:
        base["majority"] = [majority(it.answers, it.correct) for it in items]
    methods, per = {}, {}
    for m, (rows, seconds) in scores.items():
        per[m] = [top1(sc, it.correct) for it, sc in zip(items, rows)]
        ties = sum(sum(_key(s) == max(map(_key, sc)) for s in sc) > 1 for sc in rows)
        methods[m] = {"label": (labels or {}).get(m, method_label(m)),
                      "top1": sum(per[m]) / len(items), "subsets": _by_subset(per[m], subsets,
                                                                               counts),
                      "ties": ties, "seconds": seconds}
    fin = lambda x: x if math.isfinite(x) else None  # noqa: E731
    rows = [{"index": k, "subset": it.subset, "correct": it.correct,
             "scores": {m: [fin(x) for x in s[0][k]] for m, s in scores.items()},
             "top1": {m: per[m][k] for m in scores}} for k, it in enumerate(items)]
    return {"protocol": "best_of_n", "n": len(items),
            "responses": sum(len(it.responses) for it in items), "subsets": counts,
            "methods": methods,
            "baselines": {b: {"top1": sum(v) / len(v), "subsets": _by_subset(v, subsets, counts)}
                          for b, v in base.items()},
            "curves": _curves(items, scores, seed, draws), "items": rows}


def evaluate(rm, items, *, methods: Sequence[str] = ("endorm_sum",), seed: int = 0,
             draws: int = DRAWS, **options) -> dict:
    """`load` (given a path), `score` and `report` in one call."""
    if not isinstance(items, list):
        items = load(items)
    return report(items, score(rm, items, methods=methods, **options), seed=seed, draws=draws)


# ----------------------------------------------------------------------------------- writing
_BASELINES = {"random": "Random", "majority": "Majority", "oracle": "Oracle"}


def format_table(rep: dict) -> str:
    """The report as plain text: one row per subset and `overall`, one column per method and
    baseline (top-1 accuracy in %), and the methods' seconds."""
    cols = [(r["label"], r) for r in rep["methods"].values()]
    cols += [(_BASELINES[b], rep["baselines"][b]) for b in _BASELINES if b in rep["baselines"]]
    first = max([len("overall"), len("seconds")] + [len(s) for s in rep["subsets"]])
    widths = [max(len(lab), 6) for lab, _ in cols]

    def row(name, n, cells):
        return "  ".join([name.ljust(first), str(n).rjust(4)] +
                         [c.rjust(w) for c, w in zip(cells, widths)])

    lines = [row("subset", "n", [lab for lab, _ in cols])]
    lines.append("-" * len(lines[0]))
    for s, n in rep["subsets"].items():
        lines.append(row(s, n, [f"{100 * r['subsets'][s]:.1f}%" for _, r in cols]))
    lines.append("-" * len(lines[0]))
    lines.append(row("overall", rep["n"], [f"{100 * r['top1']:.1f}%" for _, r in cols]))
    lines.append(row("seconds", "", [f"{r['seconds']:.1f}" if "seconds" in r else ""
                                     for _, r in cols]))
    return "\n".join(lines)


def plot_curves(rep: dict, path, *, title: Optional[str] = None) -> None:
    """Best-of-k top-1 accuracy against k for each method, with pass@1 (a random pick,
    dashed) and pass@k (any correct among k, dotted). PNG, SVG or PDF by the suffix."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cur = rep["curves"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    try:
        cmap = plt.get_cmap("tab10")
        for j, (m, ys) in enumerate(cur["methods"].items()):
            ax.plot(cur["k"], [100 * y for y in ys], marker="o", markersize=3,
                    color=cmap(j % 10), label=rep["methods"][m]["label"])
        ax.axhline(100 * rep["baselines"]["random"]["top1"], color="0.3", linestyle="--",
                   linewidth=1, label="pass@1 (random pick)")
        ax.plot(cur["k"], [100 * y for y in cur["pass@k"]], color="0.5", linestyle=":",
                label="pass@k (any correct)")
        ax.set_xlabel("k (candidates the reward model chooses among)")
        ax.set_ylabel("accuracy of the chosen response (%)")
        ax.set_xticks(cur["k"])
        ax.set_ylim(0, 105)
        ax.set_title(title or f"Best-of-k on {rep['n']} prompts", fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14),
                  frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
