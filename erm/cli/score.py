"""`erm score`: the reward of every {prompt, response, ...} line of a JSONL file, added as a field;
under torchrun the ranks score contiguous shards, and --resume continues a run that stopped."""
import json
import math
import os
import time
from pathlib import Path

from ..scoring import one_reward, truncate_option
from .models import check_srm_options, load_rm, load_srm, parameter_dtype
from .options import (DISK_ERRNOS, CLIError, atomic_output, check_model_options, check_not_input,
                      check_out, disk_error, log, model_options, stream_fd, verbose_option)
from .truncation import check_pairs, run_scoring, truncation_note


def _check_field(args) -> str:
    field = args.field
    if not field or not field.strip():
        raise CLIError("--field must be a non-empty name")
    if field in ("prompt", "response"):
        raise CLIError(f"--field {field}: that is an input field; choose another name")
    return field


def _score_model(args, rm):
    """The model `erm score` scores with: `rm`, the SentenceRM saved in --model, or an EndoRM."""
    srm = load_srm(args) if rm is None else rm if one_reward(rm) else None
    if srm is not None and rm is not None:
        check_srm_options(args, "the model")
    if srm is None:
        args.reduction = args.reduction or "sum"
        return load_rm(args, rm)
    if args.reduction is not None:
        raise CLIError(f"--reduction {args.reduction}: {args.model or 'the model'} is a "
                       f"{srm.label}, which has one response reward; leave --reduction out")
    return srm


def _weights(args, rm, loaded_from, given: bool) -> dict:
    """The identity of the weights scored with (`erm.lm.weights_fingerprint`): --model's, the
    embedded model's, or those the given model was loaded from; for a SentenceRM also its
    backbone's and the sha256 of the config it was saved with."""
    from ..loading import file_digest, weights_fingerprint
    from ..sentence_rm import CONFIG_NAME
    try:
        if args.model or not given:
            ident = {"weights": weights_fingerprint(args.model or None)}
        else:
            ident = {"weights": weights_fingerprint(loaded_from) if loaded_from else None}
        if one_reward(rm) and loaded_from:
            ident["backbone_weights"] = weights_fingerprint(loaded_from)
        config = os.path.join(os.path.expanduser(args.model or ""), CONFIG_NAME)
        if one_reward(rm) and args.model and os.path.isfile(config):
            ident["sentence_rm_config_sha256"] = file_digest(config)
    except OSError as exc:
        raise CLIError(f"cannot read the model's weight files: {exc}") from None
    return ident


def _score_fingerprint(args, rm, field, given: bool) -> dict:
    """Everything that determines the values of an `erm score` run; a part file records it and
    `--resume` reuses only parts written under the same one (the weights by their content, see
    `_weights`, so weights replaced at the same path are refused)."""
    from ..loading import file_digest
    cfg = getattr(rm.causal_lm, "config", None)
    loaded_from = getattr(cfg, "_name_or_path", None) or None
    model = args.model
    if model and os.path.exists(os.path.expanduser(model)):
        model = os.path.realpath(os.path.expanduser(model))
    elif not model and given:  # a model built by the caller: what its config names
        model = loaded_from or type(rm).__name__
    elif not model:
        model = "embedded"
    system = args.system_prompt if args.system_prompt is not None else rm.system_prompt
    return {"model": model, "scorer": rm.label,
            "reduction": None if one_reward(rm) else args.reduction, "system_prompt": system,
            "alpha": getattr(rm, "alpha", None), "gamma": getattr(rm, "gamma", None),
            "dtype": parameter_dtype(rm), "max_length": rm.max_length,
            "truncate": not args.no_truncate, "field": field,
            "data_sha256": file_digest(args.data), **_weights(args, rm, loaded_from, given)}


def _resumed_rows(args, out, n: int, fingerprint: dict, dp) -> dict:
    """{row: value} that --resume keeps: the part files every rank can see, checked against
    `fingerprint` and pooled over the ranks (without --resume: none, and leftover parts are
    removed)."""
    error, local = None, {}
    if args.resume:
        try:
            local = dp.read_parts(out, n, fingerprint)
        except (dp.PartsMismatch, OSError) as exc:
            error = str(exc)
    error = dp.agree(error)
    if error:
        raise CLIError(error)
    if not args.resume:
        dp.remove_parts(out)  # leftovers of an earlier run that was not resumed
    dp.barrier()
    return dp.gather_rows(local, everyone=True) if args.resume else {}


def _inputs(args):
    """The checked options and input before any model loads: (field, out, records, wheres)."""
    from ..data import load_records
    check_model_options(args)
    field = _check_field(args)
    out = check_out(args.out)
    check_not_input(args.data, out)
    items = load_records(args.data, field=None if args.overwrite_field else field,
                         with_lines=True)
    return field, out, [rec for _, rec in items], [f"{args.data}: line {n}" for n, _ in items]


def _check_mine(rm, args, dp, mine, wheres, prompts, responses) -> None:
    """check_pairs on this rank's rows; a bad line on any rank stops every rank."""
    error = None
    try:
        check_pairs(rm, [(wheres[i], prompts[i], responses[i]) for i in mine],
                    system_prompt=args.system_prompt, no_truncate=args.no_truncate)
    except CLIError as exc:
        error = str(exc)
    error = dp.agree(error)
    if error:
        raise CLIError(error)


def cmd_score(args, rm=None) -> int:
    """`erm score`: add the reward (`--field`, default `reward`) to every {prompt, response, ...}
    line of a JSONL file, written to `--out` in one rename when complete. Under torchrun the
    ranks score contiguous shards and rank 0 gathers the values through the process group;
    results go to part files first, so `--resume` continues a run that crashed (erm/dp.py).
    A SentenceRM saved in --model writes its response reward."""
    from .. import dp
    field, out, records, wheres = _inputs(args)
    prompts, responses = [r["prompt"] for r in records], [r["response"] for r in records]
    rank, size, args.device = dp.init(args.device)
    given = rm is not None
    rm = _score_model(args, rm)
    fingerprint = _score_fingerprint(args, rm, field, given)
    parts_at = _parts_base(out)
    done = _resumed_rows(args, parts_at, len(records), fingerprint, dp)
    mine = [i for i in dp.shard(len(records), rank, size) if i not in done]
    _check_mine(rm, args, dp, mine, wheres, prompts, responses)
    t0 = time.perf_counter()
    kwargs = {"progress": False, **truncate_option(rm, not args.no_truncate)}
    if args.reduction is not None:
        kwargs["reduction"] = args.reduction
    if args.system_prompt is not None:
        kwargs["system_prompt"] = args.system_prompt
    truncated = []

    def score(idx):
        values, cut = run_scoring(lambda: rm.score([prompts[i] for i in idx],
                                                   [responses[i] for i in idx], **kwargs),
                                  [wheres[i] for i in idx], str(args.data))
        truncated.extend(idx[j] for j in cut)
        return _finite(values.tolist(), [wheres[i] for i in idx])

    chunk = 8 * rm.batch_size
    try:
        new = dp.score_rows(mine, score, parts_at, rank, total=len(records), done=len(done),
                            chunk=chunk, progress=not args.quiet, fingerprint=fingerprint)
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        raise disk_error(dp.part_path(parts_at, rank), exc) from None
    note = truncation_note(args, wheres, sorted(truncated))
    _write_scored((out, parts_at), field, records, wheres, dp, done, dp.gather_rows(new), rank)
    if rank == 0:
        log(args, f"scored {len(records)} responses ({len(done)} resumed, {size} rank(s)) in "
                  f"{time.perf_counter() - t0:.1f}s -> {out}{note}")
    return 0


def _parts_base(out: Path) -> Path:
    """Where the part files of `out` go: OUT.part-R beside it; for standard output (`-`,
    /dev/stdout, /dev/fd/N) or a device (/dev/null) erm-score-stdout.jsonl.part-R
    (erm-score-fdN.jsonl.part-R, erm-score-null.jsonl.part-R) in the current directory."""
    fd = stream_fd(out)
    if fd is not None:
        return Path("erm-score-stdout.jsonl" if fd == 1 else f"erm-score-fd{fd}.jsonl")
    if out.is_char_device() or out.is_block_device():
        return Path(f"erm-score-{out.name}.jsonl")
    return out


def _finite(values, wheres) -> list:
    """`values` when every one is finite; else a CLIError naming the first row that is not."""
    for v, where in zip(values, wheres):
        if not math.isfinite(v):
            raise CLIError(f"{where}: the model gave a non-finite reward ({v}); nothing is "
                           "written (check the model's weights and --dtype)")
    return values


def _write_scored(outs, field, records, wheres, dp, done, values, rank) -> None:
    """Rank 0 writes the rows in input order into `out` (one rename; standard output through
    its open descriptor); then every rank removes the part files it sees (`outs`: the output
    and the base of its part files). A failure on rank 0 stops every rank and keeps the
    parts."""
    out, parts_at = outs
    error = None
    try:
        if rank == 0:
            values = {**done, **values}
            missing = [i for i in range(len(records)) if i not in values]
            if missing:
                raise CLIError(f"{len(missing)} row(s) have no score (first: "
                               f"{wheres[missing[0]]}); run again with --resume")
            with atomic_output(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for i, rec in enumerate(records):
                    f.write(json.dumps({**rec, field: values[i]}, ensure_ascii=False,
                                       allow_nan=False) + "\n")
    except Exception as exc:
        error = str(exc) or type(exc).__name__
        dp.agree(error)
        raise
    error = dp.agree(error)
    if error:
        raise CLIError(f"rank 0 could not write {out}: {error}")
    dp.remove_parts(parts_at)


def add_parser(sub) -> None:
    """Register `erm score` on an argparse subparsers object."""
    p = sub.add_parser("score", help="score {prompt, response} lines of a JSONL file",
                       description="Add the endogenous reward of each response as `reward` (or "
                                   "--field NAME) to every line of a JSONL file (plain or .gz) "
                                   "of {prompt, response, ...} objects (other keys are kept).")
    p.add_argument("--data", required=True, metavar="IN.jsonl")
    p.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="output file (not the input; written in one rename when complete; - or "
                        "/dev/stdout: written to standard output, never truncating it)")
    p.add_argument("--field", default="reward", metavar="NAME",
                   help="key the reward is written to (default: reward); an input line that "
                        "already has it is an error unless --overwrite-field")
    p.add_argument("--overwrite-field", action="store_true",
                   help="replace the --field value already present in input lines")
    p.add_argument("--reduction", choices=("sum", "mean"),
                   help="sum (default) or mean of the token rewards (not for a SentenceRM)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run that stopped: keep the rows already scored in OUT.part-* "
                        "(only when written with the same model, options and input) and score "
                        "the rest")
    verbose_option(p)
    model_options(p, srm=True)
    p.set_defaults(func=cmd_score)
