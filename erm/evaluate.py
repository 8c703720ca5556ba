"""Preference-pair evaluation: does a reward model score the chosen response above the rejected one?

    pairs = erm.data.load_pairs("pairs.jsonl")          # or a list of dicts
    report = erm.evaluate.evaluate(rm, pairs)           # rm: erm.EndoRM
    report["methods"]["endorm_sum"]["accuracy"]

Methods, all run on the same model (`rm.model`):

- ``endorm_sum``  — the endogenous reward of the response, summed over its tokens (`rm.score`).
- ``endorm_mean`` — the same, averaged over the response tokens.
- ``judge``       — a generative verifier: log p("Yes") − log p("No") when the model is asked
  whether the response is correct, helpful and harmless (`erm.judge`).
- ``length``      — the longer response (in characters) wins; a trivial baseline.
- ``srm``         — a trained sentence-level reward model (`erm.SentenceRM`, `evaluate(...,
  srm=...)`), on its own backbone.

A pair counts 1 when chosen scores above rejected, 0.5 on a tie and 0 otherwise (a NaN score
counts 0). The pairs are read by `erm.data.load_pairs` (its docstring describes the formats); the
built-in sample is ``erm/data/pairs.jsonl`` (`erm.data.default_data_path`).
"""
import math
import time
from typing import Dict, Sequence

# the readers live in erm.data; erm.evaluate still names Pair, load_pairs and default_data_path
# for erm.train_srm and dev/srm_demo.py
from .data import Pair, default_data_path, load_pairs  # noqa: F401
from .scoring import Scorer, truncate_option

#: Method name -> human-readable label (the column headers of `format_table`).
METHODS = {
    "endorm_sum": "EndoRM (sum)",
    "endorm_mean": "EndoRM (mean)",
    "judge": "Judge (Yes/No)",
    "length": "Length",
    "srm": "SentenceRM",
}
DEFAULT_METHODS = ("endorm_sum", "endorm_mean", "judge", "length")


# ----------------------------------------------------------------------------------------------
# Evaluation

def _outcome(c: float, r: float) -> float:
    """1 if chosen wins, 0.5 on a tie, 0 otherwise (NaN loses)."""
    if c > r:
        return 1.0
    if c == r:
        return 0.5
    return 0.0


def _finite(x: float):
    return x if math.isfinite(x) else None


def _method_scores(rm, method: str, prompts, responses, *, system_prompt, progress, batch_size,
                   cache: dict, truncate: bool = True):
    if method in ("endorm_sum", "endorm_mean"):
        if "endorm" not in cache:  # one forward serves both reductions
            cache["endorm"] = rm.response_rewards(prompts, responses, system_prompt=system_prompt,
                                                  progress=progress,
                                                  **truncate_option(rm, truncate))
        sums, lengths = cache["endorm"]
        out = sums.double() if method == "endorm_sum" else sums.double() / lengths
        return [float(x) for x in out.tolist()]
    if method == "judge":
        from .judge import judge_scores
        out = judge_scores(rm, prompts, responses, batch_size=batch_size, progress=progress)
        return [float(x) for x in out.tolist()]
    if method == "length":
        return [float(len(r)) for r in responses]
    if method in cache.get("srms", {}):
        srm = cache["srms"][method]
        out = srm.score(prompts, responses, system_prompt=system_prompt, progress=progress,
                        **truncate_option(srm, truncate))
        return [float(x) for x in out.tolist()]
    raise AssertionError(method)


def subset_counts(subsets: Sequence[str]) -> Dict[str, int]:
    """{subset: number of pairs} of the pairs' subsets (N strings), in sorted subset order."""
    return {s: sum(x == s for x in subsets) for s in sorted(set(subsets))}


def method_result(label: str, outcomes: Sequence[float], subsets: Sequence[str],
                   counts: Dict[str, int], seconds: float) -> dict:
    """A method's entry of the report from its per-pair outcomes and the pairs' subsets:
    accuracy overall and per subset (`counts`: `subset_counts(subsets)`), ties and seconds."""
    return {
        "label": label,
        "accuracy": sum(outcomes) / len(outcomes),
        "subsets": {s: sum(o for o, x in zip(outcomes, subsets) if x == s) / c
                    for s, c in counts.items()},
        "ties": sum(o == 0.5 for o in outcomes),
        "seconds": seconds,
    }


def method_label(method: str) -> str:
    """The column header of a method: `METHODS`'s label, or "SentenceRM (aggregate[, dir])"
    for a SentenceRM column named "srm_<aggregate>[_<dir>]"."""
    if method in METHODS:
        return METHODS[method]
    return "SentenceRM (" + ", ".join(method.split("_", 2)[1:]) + ")"


def _srm_methods(srm, rm, methods) -> dict:
    """{method name: SentenceRM} of the SentenceRM columns asked for in `methods`."""
    table = dict(srm) if isinstance(srm, dict) else {}
    if "srm" in methods and not table:
        table["srm"] = srm if srm is not None else rm
    for name, model in table.items():
        if name != "srm" and not name.startswith("srm_"):
            raise ValueError(f"SentenceRM method {name!r}: names are 'srm' or start with 'srm_'")
        if not (isinstance(model, Scorer) and model.kind == "sentence_rm"):
            raise ValueError(f"method {name!r} needs a SentenceRM (evaluate(..., srm=...))")
    missing = [m for m in methods if m.startswith("srm") and m not in table]
    if missing:
        raise ValueError(f"no SentenceRM for method(s) {missing} (evaluate(..., srm={{name: "
                         "SentenceRM}}))")
    return {m: table[m] for m in methods if m in table}


def _checked_methods(rm, methods, srm) -> tuple:
    """(methods as a tuple, {SentenceRM method: SentenceRM}); a ValueError for no methods, an
    unknown, duplicate or SentenceRM-less one."""
    methods = tuple(methods)
    srms = _srm_methods(srm, rm, methods)
    unknown = [m for m in methods if m not in METHODS and m not in srms]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"duplicate methods in {methods}")
    return methods, srms


def score_methods(rm, methods: Sequence[str], prompts, responses, *, srm=None,
                  system_prompt=None, progress: bool = True, batch_size=None,
                  truncate: bool = True) -> Dict[str, tuple]:
    """Every method's scores of N (prompt, response) pairs, as `evaluate` computes them (one
    EndoRM forward pass serves both reductions); for the protocols built on flat lists of
    responses (`erm.rmbench`, `erm.best_of_n`).

    Args:
        rm, methods, srm, system_prompt, progress, batch_size, truncate: as in `evaluate`.
        prompts: N prompts (strings or message lists).
        responses: N response strings.
    Returns:
        {method: (N float scores, not-finite values included, seconds)}, in the order of
        `methods`.
    """
    methods, srms = _checked_methods(rm, methods, srm)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    cache, out = {"srms": srms}, {}
    for m in methods:
        t0 = time.perf_counter()
        scores = _method_scores(rm, m, list(prompts), list(responses),
                                system_prompt=system_prompt, progress=progress,
                                batch_size=batch_size, cache=cache, truncate=truncate)
        out[m] = (scores, time.perf_counter() - t0)
    return out


def evaluate(rm, pairs, *, methods: Sequence[str] = DEFAULT_METHODS, progress: bool = True,
             system_prompt=None, batch_size=None, srm=None, truncate: bool = True) -> dict:
    """Preference accuracy of several scoring methods, side by side on the same model.

    Args:
        rm: an `erm.EndoRM` (only `length` works without one: pass None with methods=("length",)).
        pairs: list of `Pair` (or anything `load_pairs` accepts: a path or a list of dicts).
        methods: names from `METHODS`: "endorm_sum", "endorm_mean", "judge", "length".
        progress: show tqdm progress bars.
        system_prompt: passed to `rm.score` (None: the model's own).
        batch_size: batch size of the judge (default `rm.batch_size`; 8 for a model that is not
            an `erm.scoring.Scorer`).
        srm: the `erm.SentenceRM` that method "srm" scores with (default: `rm` when it is one),
            or several as {method name: SentenceRM}, names "srm" or starting with "srm_"
            ("srm_last" is labelled "SentenceRM (last)", "srm_last_dir" "SentenceRM (last, dir)");
            each named method is a column.
        truncate: False makes a prompt too long for max_length an error instead of a cut.

    Returns:
        A JSON-serialisable dict::

            {"n": 64, "subsets": {"arithmetic": 16, ...},
             "methods": {"endorm_sum": {"label": "EndoRM (sum)", "accuracy": 0.73,
                                        "subsets": {"arithmetic": 0.81, ...},
                                        "ties": 0, "seconds": 4.2}, ...},
             "pairs": [{"index": 0, "subset": "arithmetic", "prompt": ..., "chosen": "...",
                        "rejected": "...", "scores": {"endorm_sum": [-3.1, -5.2], ...},
                        "outcome": {"endorm_sum": 1.0, ...}}, ...]}

        `scores[method]` is [chosen score, rejected score]; `outcome` 1 / 0.5 / 0.

        Accuracy counts a tie as half a win. Scores that are not finite are written as null.
    """
    if not isinstance(pairs, list) or (pairs and not isinstance(pairs[0], Pair)):
        pairs = load_pairs(pairs)
    methods, _ = _checked_methods(rm, methods, srm)
    n = len(pairs)
    if not n:
        raise ValueError("no preference pairs to evaluate")
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    subsets = [p.subset for p in pairs]
    counts = subset_counts(subsets)

    results = {}
    per_pair = [{"index": i, "subset": p.subset, "prompt": p.prompt, "chosen": p.chosen,
                 "rejected": p.rejected, "scores": {}, "outcome": {}} for i, p in enumerate(pairs)]
    scored = score_methods(rm, methods, prompts, responses, srm=srm, system_prompt=system_prompt,
                           progress=progress, batch_size=batch_size, truncate=truncate)
    for m, (scores, seconds) in scored.items():
        outcomes = [_outcome(scores[i], scores[n + i]) for i in range(n)]
        results[m] = method_result(method_label(m), outcomes, subsets, counts, seconds)
        for i, row in enumerate(per_pair):
            row["scores"][m] = [_finite(scores[i]), _finite(scores[n + i])]
            row["outcome"][m] = outcomes[i]
    return {"n": n, "subsets": counts, "methods": results, "pairs": per_pair}


def format_table(report: dict) -> str:
    """The report as a plain-text table: one row per subset plus `overall`, one column per
    method (accuracy in %), the number of pairs, and a final `seconds` row."""
    methods = list(report["methods"])
    labels = [report["methods"][m].get("label", m) for m in methods]
    subsets = list(report["subsets"])
    first = max([len("subset"), len("overall"), len("seconds")] + [len(s) for s in subsets])
    nw = max(3, len(str(report["n"])))
    widths = [max(len(lab), 7) for lab in labels]

    def row(name, n, cells):
        return "  ".join([name.ljust(first), str(n).rjust(nw)] +
                         [c.rjust(w) for c, w in zip(cells, widths)])

    pct = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) \
        else f"{100 * x:.1f}%"  # noqa: E731
    lines = [row("subset", "n", labels)]
    lines.append("-" * len(lines[0]))
    for s in subsets:
        lines.append(row(s, report["subsets"][s], [pct(report["methods"][m]["subsets"][s])
                                                   for m in methods]))
    lines.append("-" * len(lines[0]))
    lines.append(row("overall", report["n"], [pct(report["methods"][m]["accuracy"])
                                              for m in methods]))
    lines.append(row("seconds", "", [f"{report['methods'][m]['seconds']:.1f}" for m in methods]))
    if "endorm_sum" in methods and "endorm_mean" in methods:
        lines.append("(EndoRM sum and mean share one forward pass; its time is in the first)")
    return "\n".join(lines)


def plot_report(report: dict, path, *, title=None) -> None:
    """Grouped bar chart (PNG, or any format matplotlib infers from the suffix) of the accuracy
    per subset (and overall) per method, with a dashed 50 % chance line."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    groups = list(report["subsets"]) + ["overall"]
    k = len(methods)
    width = 0.8 / max(k, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.2), dpi=120)
    try:
        cmap = plt.get_cmap("tab10")
        for j, m in enumerate(methods):
            r = report["methods"][m]
            vals = [r["subsets"][g] if g != "overall" else r["accuracy"] for g in groups]
            xs = [i + (j - (k - 1) / 2) * width for i in range(len(groups))]
            bars = ax.bar(xs, [100 * v for v in vals], width * 0.92, label=r.get("label", m),
                          color=cmap(j % 10))
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, 100 * v + 1, f"{100 * v:.0f}",
                        ha="center", va="bottom", fontsize=7)
        ax.axhline(50, color="0.3", linestyle="--", linewidth=1, label="chance (50%)")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{g}\n(n={report['subsets'].get(g, report['n'])})" for g in groups],
                           fontsize=8)
        ax.set_ylim(0, 112)
        ax.set_ylabel("accuracy (%)  chosen > rejected")
        ax.set_title(title or f"Preference accuracy ({report['n']} pairs)", fontsize=10)
        ax.legend(fontsize=8, ncol=min(k + 1, 5), loc="upper center",
                  bbox_to_anchor=(0.5, -0.18), frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
