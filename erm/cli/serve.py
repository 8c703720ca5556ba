"""`erm serve` (also `python -m erm.serve`): the endogenous reward over HTTP (`erm.serve`), with the
model options and the server's own (address, batching, threads, log level)."""
import argparse
import os
import sys
import time

from .options import check_model_options, model_options, model_overrides

_DESCRIPTION = ("Serve the endogenous reward over HTTP: POST /score (erm's protocol), POST "
                "/get_reward (OpenRLHF's remote reward model) and GET /health; concurrent "
                "requests are batched.")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0: any free port), got {n}")
    return n


def _add_server_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free)")
    s.add_argument("--max-batch-size", type=_positive_int, default=32, metavar="N",
                   help="most pairs scored together and per forward pass (default 32)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a request waits for others to batch with (default 5)")
    s.add_argument("--reduction", choices=("sum", "mean"), default="sum",
                   help="reduction of /get_reward (OpenRLHF) rewards (default sum)")
    s.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads of the scoring worker (default: torch's choice; 1 on "
                        "a CPU shared with other jobs)")
    s.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn log level (default warning; debug logs every request)")


def _loader(args):
    """A zero-argument function loading --model as an EndoRM (run in the server's worker)."""
    def load():
        from ..model import EndoRM
        kw = dict(model_overrides(args), dtype=args.dtype, batch_size=args.max_batch_size)
        if args.device_map is not None:
            kw["device_map"] = args.device_map
        else:
            kw["device"] = args.device
        t0 = time.perf_counter()
        out = EndoRM.from_pretrained(args.model, **kw)
        print(f"erm serve: loaded {args.model or 'the default model'} in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        return out
    return load


def _run(args, rm=None) -> int:
    """The handler of `erm serve`: serve `rm` when given, else load --model in the worker."""
    check_model_options(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("erm serve: error: needs fastapi and uvicorn: pip install 'erm[serve]'",
              file=sys.stderr)
        return 2
    if args.max_wait_ms < 0:
        print("erm serve: error: --max-wait-ms must be >= 0", file=sys.stderr)
        return 2
    from ..serve import serve
    name = os.path.basename(os.path.normpath(args.model)) if args.model else None

    def announce(url):
        print(f"erm serve: listening on {url} (POST /score, POST /get_reward, GET /health)",
              file=sys.stderr, flush=True)

    try:
        return serve(_loader(args) if rm is None else rm, args.host, args.port,
                     log_level=args.log_level, announce=announce,
                     max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     reduction=args.reduction, truncate=not args.no_truncate, name=name,
                     threads=args.threads)
    except OSError as exc:
        print(f"erm serve: error: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 2


def add_parser(sub) -> None:
    """Register `erm serve` on an argparse subparsers object."""
    p = sub.add_parser("serve", help="serve endogenous rewards over HTTP (/score, "
                                     "OpenRLHF /get_reward)", description=_DESCRIPTION)
    model_options(p, ("model", "system_prompt", "alpha", "gamma", "device", "device_map",
                      "dtype", "max_length", "no_truncate"))
    _add_server_options(p)
    p.set_defaults(func=_run)
