"""`erm eval` on RM-Bench files (`erm.rmbench`) and best-of-N files with verified answers
(`erm.best_of_n`): recognising them (by the first record's fields), the built-in samples
(`--sample`), `--reduction`, and the run: score, print the table, write --out and --plot whole
or not at all."""
import os
import time
from importlib import resources

from .. import best_of_n, rmbench
from ..evaluate import METHODS
from .models import model_label
from .options import CLIError, atomic_output, check_not_input, check_out, json_text, log
from .truncation import check_pairs, run_scoring, truncation_note

#: --sample name -> the built-in file (None: the preference pairs `erm eval` reads by default).
SAMPLES = {"pairs": None, "best-of-n": "best_of_n.jsonl", "rmbench": "rmbench_demo.jsonl"}
_KINDS = (("rmbench", rmbench), ("best_of_n", best_of_n))


def with_reduction(methods: str, reduction) -> str:
    """--methods with its EndoRM columns replaced by the one of --reduction ("sum" / "mean";
    None: unchanged), e.g. "endorm_sum,endorm_mean,judge" + "mean" -> "endorm_mean,judge"."""
    if reduction is None:
        return methods
    out = []
    for m in (x.strip() for x in methods.split(",") if x.strip()):
        m = f"endorm_{reduction}" if m in ("endorm_sum", "endorm_mean") else m
        if m not in out:
            out.append(m)
    return ",".join(out)


def load_bench(args):
    """(kind "rmbench" | "best_of_n", items, source name) when --data holds RM-Bench or
    best-of-N records, or --sample names one of those built-in files; None otherwise (pairs).

    Raises:
        CLIError: --data and a --sample file both given.
        DataError: an RM-Bench or best-of-N file with a malformed record (file and item)."""
    sample = getattr(args, "sample", None)
    if sample is not None and SAMPLES.get(sample) is not None:
        if args.data is not None:
            raise CLIError(f"--sample {sample} reads a built-in file: leave out --data")
        path, source = resources.files("erm").joinpath("data", SAMPLES[sample]), None
    elif args.data is None:
        return None
    else:
        path, source = args.data, str(args.data)
    for kind, module in _KINDS:
        items = module.try_load(path)
        if items is not None:
            return kind, items, source or f"the built-in {sample} sample"
    if source is None:  # a built-in file is always recognised
        raise AssertionError(sample)
    return None


def eval_methods(args) -> list:
    """`erm eval`'s --limit checked and --methods as a list of names from
    `erm.evaluate.METHODS` (a CLIError for none, or an unknown one)."""
    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CLIError(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    return methods


def check_eval_outputs(args) -> None:
    """`erm eval`'s --out and --plot (.png, .svg or .pdf) checked: writable, and not --data."""
    for flag, path, suffixes in (("--out", args.out, None),
                                 ("--plot", args.plot, (".png", ".svg", ".pdf"))):
        if path:
            check_not_input(args.data, check_out(path, suffixes, flag=flag), flag)


def bench_methods(args, kind: str) -> list:
    """--methods of an RM-Bench / best-of-N run, checked, with the output options."""
    methods = eval_methods(args)
    if args.format == "rewardbench":
        raise CLIError("--format rewardbench needs a RewardBench v1/v2 file as --data")
    if args.format == "rmbench" and kind != "rmbench":
        raise CLIError("--format rmbench needs an RM-Bench file as --data")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise CLIError("RM-Bench and best-of-N files are evaluated in one process: run erm eval "
                       "without torchrun")
    check_eval_outputs(args)
    return methods


def _score(args, rm, srm, methods, kind, items, source):
    """The module's scores of every response, prompts checked first; (scores, note)."""
    responses = [(it.where, it.prompt, r) for it in items
                 for r in (it.chosen + it.rejected if kind == "rmbench" else it.responses)]
    if rm is not None and any(m != "length" for m in methods):
        check_pairs(rm, responses, system_prompt=args.system_prompt,
                    no_truncate=args.no_truncate)
    module = rmbench if kind == "rmbench" else best_of_n
    options = {"srm": srm or None, "system_prompt": args.system_prompt,
               "progress": not args.quiet, "truncate": not args.no_truncate}
    wheres = [w for w, _, _ in responses]
    scores, truncated = run_scoring(lambda: module.score(rm, items, methods=methods, **options),
                                    wheres, source)
    return scores, truncation_note(args, wheres, truncated, "prompt")


def run_bench(args, rm, srm, methods, bench) -> int:
    """`erm eval` on RM-Bench or best-of-N data (`load_bench`'s triple) with the loaded models:
    the table on stdout, the report (or RM-Bench's results file) as --out, the plot as
    --plot."""
    kind, items, source = bench
    if args.limit is not None:
        items = items[:args.limit]
    t0 = time.perf_counter()
    scores, note = _score(args, rm, srm, methods, kind, items, source)
    label = model_label(args, rm) if rm is not None or srm else "(none: length only)"
    if kind == "rmbench":
        rep = rmbench.report(items, scores)
        what, table = "RM-Bench prompts", rmbench.format_table(rep)
    else:
        rep = best_of_n.report(items, scores)
        what, table = "best-of-N prompts", best_of_n.format_table(rep)
    wall = time.perf_counter() - t0
    rep.update({"model": label, "data": source, "seconds": wall})
    print(f"erm eval: {rep['n']} {what} from {source}, model {label}")
    print(table)
    if kind == "best_of_n":
        print(f"top-1: how often the best-scored response is correct (ties split); random: a "
              f"uniform pick; oracle: any correct; total {wall:.1f}s{note}")
    else:
        print(f"total {wall:.1f}s{note}")
    if args.out:
        with atomic_output(args.out) as tmp:
            if args.format == "rmbench":
                rmbench.write_rmbench_json(items, rep, tmp, method=methods[0])
            else:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(json_text(rep, "the report", indent=1, ensure_ascii=False))
        log(args, f"wrote {args.out}" + (f" (RM-Bench's results file, {methods[0]} scores)"
                                         if args.format == "rmbench" else ""))
    if args.plot:
        with atomic_output(args.plot) as tmp:
            if kind == "rmbench":
                rmbench.plot_report(rep, tmp, title=f"RM-Bench on {source} ({rep['n']} prompts)"
                                                    f"\n{label}")
            else:
                best_of_n.plot_curves(rep, tmp, title=f"Best-of-k on {source} ({rep['n']} "
                                                      f"prompts)\n{label}")
        log(args, f"wrote {args.plot}")
    return 0
