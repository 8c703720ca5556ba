"""RM-Bench files: does a reward model prefer the correct response whatever its style?

    from erm import rmbench
    items = rmbench.load("total_dataset.json")         # JSON array, JSONL (plain or .gz), Parquet
    rep = rmbench.evaluate(rm, items, methods=("endorm_sum", "judge"))  # 3×3 matrices per method
    print(rmbench.format_table(rep))
    rmbench.write_rmbench_json(items, rep, "results.json", method="endorm_sum")  # run_rm.py's file

Format (RM-Bench, THU-KEG/RM-Bench): one record per prompt, ``{"id", "prompt", "chosen": [3],
"rejected": [3], "domain"}`` (``"subset"`` is read when there is no ``"domain"``); the three
responses of each side are in the styles `STYLES` (concise, detailed plain text, detailed
markdown); other fields are kept in the RM-Bench results file and otherwise ignored.

Numbers as RM-Bench's `scripts/utils.py` (`compute_accuracy`, `split_dataset_by_domain`) computes
them, for every method:

- the 3×3 matrix acc[i][j] = the share of prompts whose chosen response in style i scores
  strictly above the rejected response in style j (a tie, or a NaN score, counts as wrong);
- hard = the mean of the 3 cells above the diagonal (a plainer chosen response against a fancier
  rejected one), normal = the mean of the diagonal, easy = the mean of the 3 cells below it;
- a domain is every record whose domain starts with "chat", "math", "code" or "safety"
  (`DOMAINS`), so "safety-refuse" and "safety-response" are pooled into one "safety" matrix; a
  domain's score is the mean of its hard, normal and easy accuracies;
- the overall hard / normal / easy are the means over the domains, and the overall score
  (``total_avg_acc``) the mean of the domain scores.

Records whose domain starts with none of `DOMAINS` are left out of the overall numbers, as
RM-Bench leaves them out, and reported on their own rows; a file without one of the four domains
averages over the domains it has (RM-Bench stops with an error there).
"""
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from . import jsonio
from .data import DataError, parse_records, read_lines, read_records, record_prompt

__all__ = ["STYLES", "DOMAINS", "RMBenchItem", "is_record", "detect", "load", "try_load",
           "style_matrix", "triangles", "domain_of", "accuracy", "score", "report", "evaluate",
           "format_table", "to_rmbench_records", "write_rmbench_json", "plot_report"]

#: The response styles, in the order of each record's lists.
STYLES = ("concise", "detailed plain", "detailed markdown")
#: RM-Bench's domains; a record belongs to the first its domain starts with.
DOMAINS = ("chat", "math", "code", "safety")
_N = len(STYLES)


@dataclass(frozen=True)
class RMBenchItem:
    """One RM-Bench prompt: three chosen and three rejected responses (in `STYLES` order)."""

    prompt: Union[str, list]
    chosen: List[str]
    rejected: List[str]
    domain: str
    id: object = None
    where: str = field(default="", compare=False, repr=False)
    record: dict = field(default_factory=dict, compare=False, repr=False)


# ------------------------------------------------------------------------------------- reading
def _json_array(path) -> Optional[list]:
    """The records of a file holding one JSON array (RM-Bench's .json files), else None."""
    if not isinstance(path, (str, os.PathLike)) or str(path).lower().endswith((".parquet", ".pq")):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if not head.lstrip().startswith(b"[") and not head.startswith(b"\x1f\x8b"):
        return None
    text = "\n".join(read_lines(path))
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    return value if isinstance(value, list) else None


def _records(path):
    """(where, record) of a JSON array ("FILE: item N"), JSONL or Parquet file."""
    items = _json_array(path)
    if items is not None:
        return [(f"{path}: item {i + 1}", rec) for i, rec in enumerate(items)]
    return read_records(path)


def is_record(rec) -> bool:
    """Whether `rec` looks like an RM-Bench record: `chosen` and `rejected` lists of responses
    (not chat messages; any length, so that a wrong length is reported by `load`), without
    RewardBench 2's `num_correct` / `total_completions`."""
    if not isinstance(rec, dict) or "num_correct" in rec or "total_completions" in rec:
        return False
    c, r = rec.get("chosen"), rec.get("rejected")
    return (isinstance(c, list) and isinstance(r, list)
            and not any(isinstance(x, dict) for x in c + r))


def detect(path) -> bool:
    """Whether the first record of `path` is an RM-Bench record (False for unreadable files)."""
    try:
        for _, rec in _records(path):
            return is_record(rec)
    except (OSError, ValueError):
        return False
    return False


def _responses(rec, name: str) -> List[str]:
    xs = rec[name]
    if not isinstance(xs, list):
        raise ValueError(f"'{name}' must be a list of {_N} responses")
    if len(xs) != _N:
        raise ValueError(f"'{name}' has {len(xs)} responses; RM-Bench has {_N} "
                         f"({', '.join(STYLES)})")
    for k, x in enumerate(xs):
        if not isinstance(x, str) or not x.strip():
            raise ValueError(f"'{name}'[{k}] ({STYLES[k]}) must be a non-empty string")
    return list(xs)


def _item(rec, where: str) -> RMBenchItem:
    """One record checked and parsed (a ValueError says what is wrong, not where)."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
    if "domain" not in rec and "subset" not in rec:
        missing.append("domain")
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    prompt = record_prompt(rec["prompt"])
    domain = rec["domain"] if "domain" in rec else rec["subset"]
    if not isinstance(domain, str) or not domain:
        raise ValueError("'domain' must be a non-empty string")
    return RMBenchItem(prompt, _responses(rec, "chosen"), _responses(rec, "rejected"), domain,
                       rec.get("id"), where, rec)


def load(path) -> List[RMBenchItem]:
    """Read an RM-Bench file: a JSON array (RM-Bench's own .json files), JSONL (plain or gzip)
    or a local Parquet file.

    Raises:
        FileNotFoundError: no such file.
        DataError: a malformed record — a missing field, a list that does not hold 3 non-empty
            responses, a bad prompt or domain — naming the file and the item / line / row.
    """
    return parse_records(_records(path), _item, str(path))


def try_load(path) -> Optional[List[RMBenchItem]]:
    """`load`'s items when the first record of `path` is an RM-Bench record, else None (also
    for a file that cannot be read: the pairs reader reports those).

    Raises:
        DataError: an RM-Bench file with a malformed record."""
    try:
        records = iter(_records(path))
        first = next(records, None)
    except (OSError, ValueError):
        return None
    if first is None or not is_record(first[1]):
        return None
    return parse_records(itertools.chain([first], records), _item, str(path))


# ----------------------------------------------------------------------------------- numbers
def _wins(c: float, r: float) -> bool:
    return c > r  # strictly: a tie, or a NaN, is wrong


def style_matrix(chosen: Sequence[Sequence[float]],
                 rejected: Sequence[Sequence[float]]) -> List[List[float]]:
    """RM-Bench's 3×3 accuracy matrix: acc[i][j] = the share of the P prompts whose chosen
    response in style i scores strictly above the rejected one in style j.

    Args:
        chosen, rejected: P lists of 3 float scores each (`STYLES` order).
    Returns:
        3 lists of 3 floats in [0, 1] (row: chosen style, column: rejected style).
    """
    if not chosen or len(chosen) != len(rejected):
        raise ValueError(f"need the same positive number of chosen and rejected score lists, "
                         f"got {len(chosen)} and {len(rejected)}")
    counts = [[0] * _N for _ in range(_N)]
    for c, r in zip(chosen, rejected):
        if len(c) != _N or len(r) != _N:
            raise ValueError(f"each score list must hold {_N} scores")
        for i in range(_N):
            for j in range(_N):
                counts[i][j] += _wins(c[i], r[j])
    return [[x / len(chosen) for x in row] for row in counts]


def triangles(matrix: Sequence[Sequence[float]]) -> Dict[str, float]:
    """{"hard": mean of the cells above the diagonal, "normal": mean of the diagonal, "easy":
    mean of the cells below it} of a 3×3 matrix."""
    upper = [matrix[i][j] for i in range(_N) for j in range(_N) if j > i]
    lower = [matrix[i][j] for i in range(_N) for j in range(_N) if j < i]
    return {"hard": sum(upper) / len(upper),
            "normal": sum(matrix[i][i] for i in range(_N)) / _N,
            "easy": sum(lower) / len(lower)}


def domain_of(domain: str) -> str:
    """The RM-Bench domain of a record's domain string: the first of `DOMAINS` it starts with
    ("safety-refuse" -> "safety"), else the string itself."""
    return next((d for d in DOMAINS if domain.startswith(d)), domain)


def accuracy(domains: Sequence[str], chosen: Sequence[Sequence[float]],
             rejected: Sequence[Sequence[float]]) -> dict:
    """RM-Bench's numbers of one method from the P records' domains and scores.

    Returns::

        {"domains": {"chat": {"n": 4, "matrix": [[...] * 3], "hard": .., "normal": ..,
                              "easy": .., "score": ..}, ...},    # DOMAINS order, others last
         "hard": .., "normal": .., "easy": .., "score": ..}      # means over DOMAINS present

    The overall numbers are None when no record belongs to one of `DOMAINS`.
    """
    groups: Dict[str, List[int]] = {}
    for k, d in enumerate(domains):
        groups.setdefault(domain_of(d), []).append(k)
    order = [d for d in DOMAINS if d in groups] + sorted(d for d in groups if d not in DOMAINS)
    out: dict = {"domains": {}}
    for d in order:
        ks = groups[d]
        m = style_matrix([chosen[k] for k in ks], [rejected[k] for k in ks])
        t = triangles(m)
        out["domains"][d] = {"n": len(ks), "matrix": m, **t,
                             "score": (t["hard"] + t["normal"] + t["easy"]) / 3}
    core = [out["domains"][d] for d in DOMAINS if d in groups]
    for key in ("hard", "normal", "easy", "score"):
        out[key] = sum(r[key] for r in core) / len(core) if core else None
    return out


# ----------------------------------------------------------------------------------- scoring
def score(rm, items: Sequence[RMBenchItem], *, methods: Sequence[str] = ("endorm_sum",),
          **options) -> Dict[str, tuple]:
    """Every method's scores of the six responses of every item, in one batched call per method
    (`erm.evaluate.score_methods`; `options`: its srm, system_prompt, progress, batch_size,
    truncate).

    Returns:
        {method: (P chosen score lists, P rejected score lists, seconds)}, 3 floats a list.
    """
    from .evaluate import score_methods
    prompts = [it.prompt for it in items for _ in range(2 * _N)]
    responses = [r for it in items for r in it.chosen + it.rejected]
    out = {}
    for m, (flat, seconds) in score_methods(rm, methods, prompts, responses, **options).items():
        rows = [flat[k * 2 * _N:(k + 1) * 2 * _N] for k in range(len(items))]
        out[m] = ([r[:_N] for r in rows], [r[_N:] for r in rows], seconds)
    return out


def _fin(x: float):
    return x if math.isfinite(x) else None


def report(items: Sequence[RMBenchItem], scores: Dict[str, tuple], *,
           labels: Optional[Dict[str, str]] = None) -> dict:
    """The report of `score`'s scores: per method, `accuracy`'s numbers plus its label and
    seconds, and RM-Bench's own result dict (``{"chat", "math", "code", "safety", "hard_acc",
    "normal_acc", "easy_acc", "total_avg_acc"}``, the domains present); per item, the scores."""
    from .evaluate import method_label
    domains = [it.domain for it in items]
    counts: Dict[str, int] = {}
    for d in domains:
        counts[domain_of(d)] = counts.get(domain_of(d), 0) + 1
    methods = {}
    for m, (ch, rj, seconds) in scores.items():
        acc = accuracy(domains, ch, rj)
        rm_bench = {d: acc["domains"][d]["score"] for d in DOMAINS if d in acc["domains"]}
        rm_bench.update(hard_acc=acc["hard"], normal_acc=acc["normal"], easy_acc=acc["easy"],
                        total_avg_acc=acc["score"])
        methods[m] = {"label": (labels or {}).get(m, method_label(m)), **acc,
                      "rmbench": rm_bench, "seconds": seconds}
    rows = [{"index": k, "id": it.id, "domain": it.domain,
             "scores": {m: {"chosen": [_fin(x) for x in s[0][k]],
                            "rejected": [_fin(x) for x in s[1][k]]} for m, s in scores.items()}}
            for k, it in enumerate(items)]
    order = [d for d in DOMAINS if d in counts] + sorted(d for d in counts if d not in DOMAINS)
    return {"protocol": "rmbench", "n": len(items), "domains": {d: counts[d] for d in order},
            "styles": list(STYLES), "methods": methods, "items": rows}


def evaluate(rm, items, *, methods: Sequence[str] = ("endorm_sum",), **options) -> dict:
    """`load` (given a path), `score` and `report` in one call."""
    if not isinstance(items, list):
        items = load(items)
    return report(items, score(rm, items, methods=methods, **options))


# ----------------------------------------------------------------------------------- writing
def format_table(rep: dict) -> str:
    """The report as plain text: for each method, one row per domain (hard, normal, easy,
    score, in %) and the overall row; then a note on how RM-Bench counts."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    names = list(rep["domains"]) + ["overall"]
    width = max(len(n) for n in names + ["domain"])
    head = f"{'domain':<{width}}  {'n':>4}  {'hard':>6}  {'normal':>6}  {'easy':>6}  {'score':>6}"
    lines = []
    for m, r in rep["methods"].items():
        lines += ["", r["label"], head, "-" * len(head)]
        for d, v in r["domains"].items():
            lines.append(f"{d:<{width}}  {v['n']:>4}  {pct(v['hard']):>6}  "
                         f"{pct(v['normal']):>6}  {pct(v['easy']):>6}  {pct(v['score']):>6}")
        core = sum(v["n"] for d, v in r["domains"].items() if d in DOMAINS)
        lines.append(f"{'overall':<{width}}  {core:>4}  {pct(r['hard']):>6}  "
                     f"{pct(r['normal']):>6}  {pct(r['easy']):>6}  {pct(r['score']):>6}")
    lines.append("RM-Bench: chosen must score strictly above rejected (a tie counts as wrong); "
                 "hard/normal/easy: the 3x3 style matrix above/on/below its diagonal; overall: "
                 "the mean of the domains chat, math, code, safety (both safety subsets pooled)")
    return "\n".join(lines[1:])


def to_rmbench_records(items: Sequence[RMBenchItem], rep: dict, method: str) -> List[dict]:
    """The results file RM-Bench's `scripts/run_rm.py` writes for one model: every input
    record with ``score_chosen`` and ``score_rejected`` (3 floats each) added — what its
    `compute_accuracy` reads. `method`: the method of `rep` whose scores are written."""
    if method not in rep["methods"]:
        raise ValueError(f"method {method!r} is not in the report ({list(rep['methods'])})")
    out = []
    for it, row in zip(items, rep["items"]):
        s = row["scores"][method]
        out.append({**it.record, "score_chosen": s["chosen"], "score_rejected": s["rejected"]})
    return out


def write_rmbench_json(items: Sequence[RMBenchItem], rep: dict, path, method: str) -> None:
    """`to_rmbench_records` written as RM-Bench writes it (a JSON array, indent 4, UTF-8)."""
    text = jsonio.dumps(to_rmbench_records(items, rep, method), "the RM-Bench results", indent=4,
                        ensure_ascii=False)
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        f.write(text)


def plot_report(rep: dict, path, *, title: Optional[str] = None) -> None:
    """One row per method: the 3×3 matrix of each domain as a heat-map (rows: chosen style,
    columns: rejected style); below, the overall hard / normal / easy accuracies of every
    method side by side as bars. PNG, SVG or PDF by the suffix of `path`."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods, domains = list(rep["methods"]), list(rep["domains"])
    short = ["concise", "plain", "markdown"]
    fig = plt.figure(figsize=(2.3 * len(domains) + 1.2, 2.2 * len(methods) + 3.2), dpi=110)
    grid = fig.add_gridspec(len(methods) + 1, len(domains),
                            height_ratios=[1.0] * len(methods) + [1.3])
    try:
        for a, m in enumerate(methods):
            for b, d in enumerate(domains):
                ax = fig.add_subplot(grid[a, b])
                mat = rep["methods"][m]["domains"][d]["matrix"]
                ax.imshow([[100 * x for x in row] for row in mat], vmin=0, vmax=100,
                          cmap="RdYlGn")
                for i in range(_N):
                    for j in range(_N):
                        ax.text(j, i, f"{100 * mat[i][j]:.0f}", ha="center", va="center",
                                fontsize=8)
                ax.set_xticks(range(_N), short if a == len(methods) - 1 else [""] * _N,
                              fontsize=7)
                ax.set_yticks(range(_N), short if b == 0 else [""] * _N, fontsize=7)
                ax.set_title(f"{rep['methods'][m]['label']}: {d}", fontsize=8)
                if b == 0:
                    ax.set_ylabel("chosen", fontsize=7)
                if a == len(methods) - 1:
                    ax.set_xlabel("rejected", fontsize=7)
        _bars(fig.add_subplot(grid[len(methods), :]), rep, methods)
        fig.suptitle(title or f"RM-Bench ({rep['n']} prompts): rows chosen style, columns "
                     "rejected style", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _bars(ax, rep: dict, methods: List[str]) -> None:
    """Grouped bars of the overall hard / normal / easy accuracy of each method."""
    import matplotlib.pyplot as plt
    keys = ("hard", "normal", "easy")
    width = 0.8 / max(len(methods), 1)
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        r = rep["methods"][m]
        vals = [100 * (r[k] or 0.0) for k in keys]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, vals, width * 0.92, label=r["label"], color=cmap(j % 10))
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 1, f"{v:.0f}", ha="center",
                    va="bottom", fontsize=7)
    ax.axhline(50, color="0.3", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 110)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, ncol=min(len(methods), 5), loc="upper center", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
