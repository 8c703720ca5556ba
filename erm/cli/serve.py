"""`erm serve` (also `python -m erm.serve`): the endogenous reward over HTTP (`erm.serve`), with the
model options and the server's own (address, batching, threads, log level, API key, docs) and its
limits (body size, pairs per request, queue, read timeout, shutdown drain)."""
import argparse
import math
import os
import sys
import time

from ..serve.app import MAX_BODY_BYTES, READ_TIMEOUT, SHUTDOWN_TIMEOUT
from ..serve.batcher import MAX_PAIRS, MAX_QUEUE
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


def _number(text: str, *, low: float = 0.0, strict: bool = False) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(x) or x < low or (strict and x == low):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} "
                                         f"{low:g}, got {text}")
    return x


def _wait_ms(text: str) -> float:
    return _number(text)


def _positive(text: str) -> float:
    return _number(text, strict=True)


def _add_server_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; another address without an API "
                        "key warns)")
    s.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free)")
    s.add_argument("--max-batch-size", type=_positive_int, default=32, metavar="N",
                   help="most pairs scored together and per forward pass (default 32)")
    s.add_argument("--max-wait-ms", type=_wait_ms, default=5.0, metavar="MS",
                   help="how long a request waits for others to batch with: finite, >= 0 "
                        "(default 5)")
    s.add_argument("--reduction", choices=("sum", "mean"), default="sum",
                   help="reduction of /get_reward (OpenRLHF) rewards (default sum)")
    s.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads of the scoring worker (default: torch's choice; 1 on "
                        "a CPU shared with other jobs)")
    s.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn log level (default warning; debug logs every request)")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /score and /get_reward (401 "
                        "without it; default: $ERM_API_KEY, else none)")
    s.add_argument("--docs", action="store_true",
                   help="serve the API's /docs and /openapi.json (off by default)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-mb", type=_positive, default=MAX_BODY_BYTES / 2 ** 20,
                     metavar="MIB", help="largest request body in MiB; larger: 413 (default 16)")
    lim.add_argument("--max-pairs", type=_positive_int, default=MAX_PAIRS, metavar="N",
                     help=f"most pairs in one request; more: 413 (default {MAX_PAIRS})")
    lim.add_argument("--max-queue", type=_positive_int, default=MAX_QUEUE, metavar="N",
                     help="most pairs waiting to be scored; a request that would go over gets "
                          f"429 with Retry-After (default {MAX_QUEUE})")
    lim.add_argument("--read-timeout", type=_positive, default=READ_TIMEOUT, metavar="S",
                     help="seconds a client has to send its whole body; slower: 408 and the "
                          f"connection closed (default {READ_TIMEOUT:g})")
    lim.add_argument("--shutdown-timeout", type=_positive, default=SHUTDOWN_TIMEOUT, metavar="S",
                     help="on SIGTERM, seconds to answer the requests already received before "
                          f"the rest get 503 (default {SHUTDOWN_TIMEOUT:g})")


def server_kwargs(args) -> dict:
    """The keyword arguments of `erm.serve.serve` that the server options give (the API key
    from --api-key, else $ERM_API_KEY)."""
    key = args.api_key if args.api_key is not None else os.environ.get("ERM_API_KEY") or None
    return dict(log_level=args.log_level, max_batch_size=args.max_batch_size,
                max_wait_ms=args.max_wait_ms, reduction=args.reduction,
                truncate=not args.no_truncate, threads=args.threads, api_key=key,
                docs=args.docs, max_body_bytes=max(1, int(args.max_body_mb * 2 ** 20)),
                max_pairs=args.max_pairs, max_queue=args.max_queue,
                read_timeout=args.read_timeout, shutdown_timeout=args.shutdown_timeout)


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
    if args.api_key == "":
        print("erm serve: error: --api-key is empty", file=sys.stderr)
        return 2
    from ..serve import serve
    name = os.path.basename(os.path.normpath(args.model)) if args.model else None

    def announce(url):
        print(f"erm serve: listening on {url} (POST /score, POST /get_reward, GET /health)",
              file=sys.stderr, flush=True)

    try:
        return serve(_loader(args) if rm is None else rm, args.host, args.port,
                     announce=announce, name=name, **server_kwargs(args))
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
