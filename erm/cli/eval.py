"""`erm eval`: preference accuracy of EndoRM, the Yes/No judge, a length baseline and saved
SentenceRMs on chosen/rejected pairs, or RewardBench's own scores on RewardBench v1/v2 files;
under torchrun the pairs are split over the ranks and rank 0 reports all of them."""
import os
import time
from pathlib import Path

from ..evaluate import DEFAULT_METHODS, METHODS
from .models import check_srm_options, load_rm, load_srm, model_label
from .eval_bench import (SAMPLES, bench_methods, check_eval_outputs, eval_methods, load_bench,
                         run_bench, with_reduction)
from .options import (CLIError, atomic_output, check_model_options, check_not_input, check_out,
                      json_text, log, model_options, model_overrides, srm_overrides,
                      verbose_option)
from .truncation import check_pairs, run_scoring, truncation_note


def _split_models(args) -> list:
    """`erm eval`'s repeated --model: the saved SentenceRM directories among them (returned);
    args.model becomes the one EndoRM model (a name or directory) when given, else the first
    SentenceRM directory (whose base model's EndoRM is evaluated beside it)."""
    from ..sentence_rm import is_sentence_rm_dir
    models = args.model if isinstance(args.model, list) else [args.model] if args.model else []
    srms = [m for m in models if is_sentence_rm_dir(m)]
    others = [m for m in models if m not in srms]
    if len(others) > 1:
        raise CLIError(f"--model {' '.join(others)}: give at most one EndoRM model (a name or "
                       "directory); repeat --model only for SentenceRM directories saved by "
                       "erm train-srm")
    if len(set(srms)) != len(srms):
        raise CLIError("--model: the same SentenceRM directory is given twice")
    args.model = others[0] if others else (srms[0] if srms else None)
    return srms


def srm_columns(dirs, aggregates) -> dict:
    """{method name: directory} of SentenceRM columns: "srm" for one, else "srm_<aggregate>",
    with "_<directory name>" added where two share an aggregate."""
    if len(dirs) == 1:
        return {"srm": dirs[0]}
    out = {}
    for d, agg in zip(dirs, aggregates):
        shared = sum(a == agg for a in aggregates) > 1
        name = f"srm_{agg}_{Path(os.path.normpath(d)).name}" if shared else f"srm_{agg}"
        if name in out:
            raise CLIError(f"--model {d}: two SentenceRM columns would both be named {name}; "
                           "give the directories different names")
        out[name] = d
    return out


def _load_eval_models(args, rm, methods, srm_dirs):
    """(EndoRM or None, {method: SentenceRM}, methods) for `erm eval`: each SentenceRM saved
    in a --model directory adds its column; the EndoRM is --model's other model, else that of
    the first SentenceRM's base model (sharing the backbone when it was not trained)."""
    from ..sentence_rm import load_for_eval, read_config
    if not srm_dirs:
        needs_model = any(m != "length" for m in methods)
        return (load_rm(args, rm) if needs_model else rm), {}, methods
    for d in srm_dirs:
        check_srm_options(args, d, alone=False)
    columns = srm_columns(srm_dirs, [read_config(d)["aggregate"] for d in srm_dirs])
    srms, endo = {}, rm
    for name, d in columns.items():
        try:
            if endo is None and args.model == d:
                endo, srms[name] = load_for_eval(d, device=args.device, dtype=args.dtype,
                                                 srm_overrides=srm_overrides(args),
                                                 **model_overrides(args))
                if endo is None:  # a fine-tuned backbone whose base model cannot be named
                    methods = [m for m in methods if m == "length"]
            else:
                srms[name] = load_srm(args, d, alone=False)
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot load the SentenceRM in {d}: {exc}") from None
    if endo is None and any(m != "length" for m in methods):
        endo = load_rm(args)
    methods = [m for m in methods if m not in srms] + list(srms)
    return endo, srms, methods


def _eval_inputs(args):
    """`erm eval`'s checked inputs before the model: (data, pairs, methods)."""
    from ..data import default_data_path, load_pairs
    check_model_options(args)
    methods = eval_methods(args)
    check_eval_outputs(args)
    data = args.data if args.data is not None else default_data_path()
    pairs = load_pairs(data)
    if args.limit is not None:
        pairs = pairs[:args.limit]
    return data, pairs, methods


def _evaluate(args, rm, pairs, methods, srm=None):
    """evaluate() with the pairs checked first and its truncation warnings mapped to lines."""
    from ..evaluate import evaluate
    if rm is not None and any(m != "length" for m in methods):
        check_pairs(rm, [(p.where, p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)],
                     system_prompt=args.system_prompt, no_truncate=args.no_truncate)
    kwargs = {"methods": methods, "progress": not args.quiet,
              "system_prompt": args.system_prompt, "srm": srm or None,
              "truncate": not args.no_truncate}
    n = len(pairs)
    wheres = [p.where or f"pair {i + 1}" for i, p in enumerate(pairs)]
    report, truncated = run_scoring(lambda: evaluate(rm, pairs, **kwargs), wheres * 2,
                                     str(args.data or "built-in sample"))
    note = truncation_note(args, wheres, sorted({i % n for i in truncated}), "pair prompt")
    return report, note


def _rewardbench_model(args, rm, methods, srm_dirs):
    """(model, label, reduction) RewardBench data is scored with: `rm`, the SentenceRM saved in
    --model (its response reward), or EndoRM (sum, or mean when that is the one method asked)."""
    if len(srm_dirs) > 1 or (srm_dirs and args.model != srm_dirs[0]):
        raise CLIError("RewardBench data is scored with one model: give one --model")
    srm = load_srm(args) if rm is None and srm_dirs else None
    if srm is not None:
        return srm, f"{args.model} (SentenceRM, {srm.aggregate})", f"SentenceRM ({srm.aggregate})"
    if set(methods) - {"endorm_sum", "endorm_mean"}:
        methods = ["endorm_sum"]  # RewardBench scores one reward model: EndoRM (sum) unless mean
    rm = load_rm(args, rm)
    reduction = getattr(args, "reduction", None) or (
        "mean" if methods == ["endorm_mean"] else "sum")
    return rm, model_label(args, rm), reduction


def _eval_rewardbench(args, rm, data, methods, srm_dirs) -> int:
    """`erm eval` on the RewardBench v1/v2 `data` read from --data: its section (v1) or
    best-of-N (v2) scores. Under torchrun every rank scores a contiguous shard of the items, the
    scores are gathered and rank 0 prints and writes the report of all of them."""
    import dataclasses

    from .. import dp, rewardbench
    if args.plot:
        raise CLIError("--plot is not available for RewardBench data")
    if args.limit is not None:
        data.items = data.items[:args.limit]
    rank, size, args.device = dp.init(args.device)
    if rank != 0:
        args.quiet = True
    rm, label, reduction = _rewardbench_model(args, rm, methods, srm_dirs)
    idx = dp.shard(len(data.items), rank, size)
    mine = dataclasses.replace(data, items=data.items[idx.start:idx.stop])
    t0 = time.perf_counter()
    res, error = ([], 0), None
    try:
        scores, truncated = run_scoring(lambda: rewardbench.score(
            rm, mine, reduction="sum" if reduction not in ("sum", "mean") else reduction,
            system_prompt=args.system_prompt, progress=not args.quiet,
            truncate=not args.no_truncate), [], str(args.data))
        res = (scores, len(truncated))
    except (CLIError, ValueError) as exc:
        error = str(exc)
    parts = dp.gather_or_raise(res, error, CLIError)
    if rank != 0:
        return 0
    rep = rewardbench.report(data, [s for p in parts for s in p[0]], model=label,
                             reduction=reduction)
    rep["seconds"] = time.perf_counter() - t0
    print(f"erm eval: RewardBench {rep['version']} file {args.data}, model {label}")
    print(rewardbench.format_table(rep))
    cut = sum(p[1] for p in parts)
    if cut:
        print(f"{cut} prompt(s) cut from the left to fit --max-length")
    if args.out:
        with atomic_output(args.out) as tmp:
            if args.format == "rewardbench":
                rewardbench.write_rewardbench_json(rep, tmp, model=label)
            else:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(json_text(rep, "the report", indent=1, ensure_ascii=False))
        log(args, f"wrote {args.out}")
    return 0


def _evaluate_dp(args, rm, pairs, methods, srm, rank: int, size: int):
    """`_evaluate` under torchrun: each rank evaluates a contiguous shard of the pairs, the
    per-pair results are gathered (one all_gather_object) and every rank builds the report of
    all pairs in input order. An error on any rank is raised on every rank."""
    from .. import dp
    idx = dp.shard(len(pairs), rank, size)
    mine, error = None, None
    try:
        mine = _evaluate(args, rm, pairs[idx.start:idx.stop], methods, srm) if len(idx) else None
    except (CLIError, ValueError) as exc:
        error = str(exc)
    parts = dp.gather_or_raise((idx.start, mine), error, CLIError)
    done = [(start, out) for start, out in parts if out is not None]  # out: (report, note)
    got = [(start, out[0]) for start, out in done]
    notes = "".join(out[1] for _, out in done)
    return _merge_reports(pairs, methods, got), notes


def _merge_reports(pairs, methods, parts):
    """One `evaluate` report from the reports of contiguous shards [(first index, report)]:
    the per-pair rows re-indexed and concatenated, the accuracies recounted from the outcomes
    (a method's seconds: the slowest shard)."""
    from ..evaluate import method_result, subset_counts
    rows = []
    for start, rep in parts:
        for row in rep["pairs"]:
            rows.append({**row, "index": row["index"] + start})
    subsets = [r["subset"] for r in rows]
    counts = subset_counts([p.subset for p in pairs])
    results = {m: method_result(parts[0][1]["methods"][m]["label"],
                                 [r["outcome"][m] for r in rows], subsets, counts,
                                 max(rep["methods"][m]["seconds"] for _, rep in parts))
               for m in methods}
    return {"n": len(rows), "subsets": counts, "methods": results, "pairs": rows}


def cmd_eval(args, rm=None) -> int:
    """`erm eval`: preference accuracy of EndoRM (sum, mean), the Yes/No judge, length and each
    SentenceRM saved in a --model directory; on RewardBench v1/v2 files, RewardBench's section or
    best-of-N scores. Under torchrun the pairs (or RewardBench items) are split over the ranks
    and rank 0 prints and writes the report of all of them."""
    from .. import dp, rewardbench
    from ..evaluate import format_table, plot_report
    models = list(args.model or [])
    srm_dirs = _split_models(args)
    args.methods = with_reduction(args.methods, getattr(args, "reduction", None))
    rb_data = rewardbench.try_load(args.data) if args.data is not None else None
    if rb_data is not None:
        check_model_options(args)
        if args.out:
            check_not_input(args.data, check_out(args.out), "--out")
        return _eval_rewardbench(args, rm, rb_data, [m.strip() for m in args.methods.split(",")],
                                 srm_dirs)
    bench = load_bench(args)  # RM-Bench or best-of-N data: erm.cli.eval_bench
    if bench is not None:
        check_model_options(args)
        methods = bench_methods(args, bench[0])
        rm, srm, methods = _load_eval_models(args, rm, methods, srm_dirs)
        return run_bench(args, rm, srm, methods, bench)
    if args.format in ("rewardbench", "rmbench"):
        raise CLIError(f"--format {args.format} needs a "
                       f"{'RewardBench v1/v2' if args.format == 'rewardbench' else 'RM-Bench'} "
                       "file as --data")
    data, pairs, methods = _eval_inputs(args)
    rank, size, args.device = dp.init(args.device)
    if rank != 0:
        args.quiet = True  # one progress bar and one report: rank 0's
    rm, srm, methods = _load_eval_models(args, rm, methods, srm_dirs)
    t0 = time.perf_counter()
    if size > 1:
        report, note = _evaluate_dp(args, rm, pairs, methods, srm, rank, size)
        if rank != 0:
            return 0
    else:
        report, note = _evaluate(args, rm, pairs, methods, srm)
    wall = time.perf_counter() - t0
    label = ", ".join(models) if len(models) > 1 else model_label(args, rm) \
        if rm is not None or srm else "(none: length only)"
    source = "built-in sample" if args.data is None else args.data
    report.update({"model": label, "data": str(source), "seconds": wall})
    print(f"erm eval: {report['n']} pairs from {'the ' if args.data is None else ''}{source}, "
          f"model {label}")
    print(format_table(report))
    print(f"accuracy: how often chosen scores above rejected (a tie counts half); "
          f"total {wall:.1f}s{note}")
    if args.out:
        text = json_text(report, "the report", indent=1, ensure_ascii=False)
        with atomic_output(args.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        log(args, f"wrote {args.out}")
    if args.plot:
        with atomic_output(args.plot) as tmp:
            plot_report(report, tmp,
                        title=f"Preference accuracy on {source} ({report['n']} pairs), {label}")
        log(args, f"wrote {args.plot}")
    return 0


def add_parser(sub) -> None:
    """Register `erm eval` on an argparse subparsers object."""
    p = sub.add_parser("eval", help="preference accuracy on chosen/rejected pairs",
                       description="Accuracy of EndoRM (sum and mean), a Yes/No generative judge "
                                   "and a length baseline at ranking the chosen response above "
                                   "the rejected one. Data: JSONL (plain or .gz) of {prompt, "
                                   "chosen, rejected, subset?} (prompt: string or messages), "
                                   "RewardBench/TRL message lists, or HH-RLHF transcripts; "
                                   "RewardBench v1/v2, RM-Bench files and best-of-N files "
                                   "{prompt, responses, correct, answers?} are recognised by "
                                   "their fields and reported as their protocols do.")
    p.add_argument("--data", metavar="PAIRS.jsonl",
                   help="preference pairs (default: the built-in 64-pair sample)")
    p.add_argument("--out", metavar="REPORT.json", help="write the full report (with per-pair "
                                                        "scores) as JSON")
    p.add_argument("--plot", metavar="REPORT.png", help="write a grouped bar chart")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N pairs")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="M1,M2",
                   help=f"comma-separated subset of {','.join(METHODS)} "
                        f"(default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--format", choices=("erm", "rewardbench", "rmbench"), default="erm",
                   help="layout of --out: erm's report (default), RewardBench's results JSON "
                        "(RewardBench data) or RM-Bench's results file (RM-Bench data; the "
                        "scores of the first method)")
    p.add_argument("--sample", choices=tuple(SAMPLES), metavar="NAME",
                   help="a built-in file instead of --data: pairs (the default), best-of-n "
                        "(arithmetic questions with checked candidate solutions) or rmbench "
                        "(a small RM-Bench-shaped file)")
    p.add_argument("--reduction", choices=("sum", "mean"),
                   help="one EndoRM column, with this reduction, in place of both")
    verbose_option(p)
    model_options(p, srm=True, repeat_model=True)
    p.set_defaults(func=cmd_eval)
