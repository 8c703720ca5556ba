"""The reward server's HTTP side: `make_app` (the FastAPI app: /health, /score, /get_reward, with
the body limits, the read timeout and the optional bearer token), `serve` (until SIGTERM / Ctrl-C,
draining the requests in flight for at most `shutdown_timeout` seconds) and `running` (a server on
a free loopback port in a thread, for tests and notebooks)."""
import asyncio
import contextlib
import hmac
import ipaddress
import logging
import math
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

from .batcher import ClientGone, RewardServer
from .protocol import RequestError, parse_get_reward, parse_json, parse_score

log = logging.getLogger("erm.serve")

#: Default limits of the HTTP side: body size, seconds to receive a body, seconds of drain.
MAX_BODY_BYTES = 16 * 2 ** 20
READ_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 30.0
_APP_OPTIONS = ("api_key", "docs", "max_body_bytes", "read_timeout")
_CLOSE = {"Connection": "close"}


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_app_options(api_key, max_body_bytes, read_timeout) -> None:
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or \
            max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    _positive(read_timeout, "read_timeout")


async def read_body(receive, headers, max_bytes: int, timeout: float) -> bytes:
    """The request body from the ASGI `receive`: RequestError 413 past `max_bytes` (declared by
    Content-Length or counted as it arrives), 408 when it is not all there within `timeout`
    seconds; ClientGone when the client disconnects before the end."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(f"the body is {int(declared)} bytes; this server takes at most "
                           f"{max_bytes} (max_body_bytes)", 413, _CLOSE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks, n = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise RequestError(f"the body did not arrive within {timeout:g} s (read_timeout; "
                               f"{n} bytes received)", 408, _CLOSE) from None
        if message["type"] == "http.disconnect":
            raise ClientGone(f"the client disconnected while sending the body ({n} bytes "
                             f"received{f' of {declared}' if declared else ''})")
        chunk = message.get("body", b"")
        n += len(chunk)
        if n > max_bytes:
            raise RequestError(f"the body is more than {max_bytes} bytes (max_body_bytes)", 413,
                               _CLOSE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _disconnected(receive) -> None:
    """Completes when the client of a request whose body was read goes away."""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def _authorized(headers, api_key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not depend on how much of the token is right
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode())


def make_app(rm, *, api_key: Optional[str] = None, docs: bool = False,
             max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT,
             **kwargs):
    """A FastAPI app serving `rm` (an `erm.EndoRM`, a callable returning one, or a
    `RewardServer`); the server object is `app.state.server`.

    Args:
        api_key: when set, /score and /get_reward answer 401 unless the request carries
            ``Authorization: Bearer <api_key>`` (compared in constant time); /health stays open.
        docs: serve /docs and /openapi.json (off by default).
        max_body_bytes: largest request body (more: 413).
        read_timeout: seconds a client has to send a whole body once its headers arrived
            (slower: 408, and the connection is closed).
        kwargs: as in `RewardServer` (batching and its limits).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    _check_app_options(api_key, max_body_bytes, read_timeout)
    server = rm if isinstance(rm, RewardServer) else RewardServer(rm, **kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="erm reward server", lifespan=lifespan,
                  description="Endogenous rewards of a causal LM (erm).",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.server = server

    async def answer(job_of, request: Request, path: str):
        try:
            if api_key is not None and not _authorized(request.headers, api_key):
                raise RequestError("missing or wrong API key: send 'Authorization: Bearer "
                                   "<key>'", 401, {"WWW-Authenticate": "Bearer", **_CLOSE})
            raw = await read_body(request.receive, request.headers, max_body_bytes,
                                  read_timeout)
            job = job_of(parse_json(raw))
            return JSONResponse(await server.submit(job, _disconnected(request.receive)))
        except RequestError as exc:
            return JSONResponse({"detail": str(exc)}, exc.status, exc.headers)
        except ClientGone as exc:
            client = request.client
            log.info("%s from %s: %s", path, f"{client.host}:{client.port}" if client else "?",
                     exc)
            return Response(status_code=499)  # nobody reads it
        except asyncio.CancelledError:  # uvicorn ends what the shutdown drain did not finish
            log.info("%s: dropped at shutdown (shutdown_timeout)", path)
            return JSONResponse({"detail": "the server is shutting down"}, 503, _CLOSE)

    @app.get("/health")
    async def health():
        if server.load_error is not None:
            return JSONResponse({"status": "error", "detail": str(server.load_error)}, 503)
        if server.worker_error is not None or server.stopped:
            return JSONResponse({"status": "error", "detail": f"the scoring worker stopped: "
                                 f"{server.worker_error!r}"}, 503)
        if not server.ready:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ok", "model": server.name, "max_batch_size": server.max_batch_size}

    @app.post("/score")
    async def score(request: Request):
        return await answer(parse_score, request, "/score")

    @app.post("/get_reward")
    async def get_reward(request: Request):
        return await answer(parse_get_reward, request, "/get_reward")

    return app


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """The warning for serving on `host` without a token: None on a loopback address or with
    an `api_key`, else a line saying who can reach it."""
    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"listening on {host} without an API key: anyone who can reach this address can "
            "use the server (set ERM_API_KEY or --api-key, or bind 127.0.0.1)")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets that say so (with
    # proto 0 each response's body waited ~40 ms for the client's delayed ACK of its headers)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _split(rm, kwargs: dict):
    """(RewardServer, make_app's own keyword arguments) from serve's / running's kwargs."""
    app_kw = {k: kwargs.pop(k) for k in _APP_OPTIONS if k in kwargs}
    server = rm if isinstance(rm, RewardServer) else RewardServer(rm, **kwargs)
    return server, app_kw


def _uvicorn_server(app, log_level: str, shutdown_timeout: float):
    import uvicorn

    # uvicorn's own limits kept: 5 s idle keep-alive, 16 KiB of request headers (h11)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug",
                            lifespan="on", timeout_graceful_shutdown=shutdown_timeout)
    return uvicorn.Server(config)


def serve(rm, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
          announce: Optional[Callable[[str], None]] = None,
          shutdown_timeout: float = SHUTDOWN_TIMEOUT, **kwargs) -> int:
    """Serve `rm` (an EndoRM, a callable returning one, or a `RewardServer`) until SIGTERM /
    Ctrl-C; returns the exit status (1 when the model failed to load). `announce(url)` is called
    once the port is bound (port 0 picks a free one). On SIGTERM the requests already received
    are answered for at most `shutdown_timeout` seconds, then the rest get 503. Other keyword
    arguments as in `make_app` and `RewardServer`; warns on stderr when `host` is not a loopback
    address and there is no `api_key`."""
    _positive(shutdown_timeout, "shutdown_timeout")
    server, app_kw = _split(rm, kwargs)
    app = make_app(server, **app_kw)
    warning = exposure_warning(host, app_kw.get("api_key"))
    if warning:
        print(f"erm serve: warning: {warning}", file=sys.stderr, flush=True)
    sock = _bind(host, port)
    userver = _uvicorn_server(app, log_level, shutdown_timeout)

    def failed(exc):
        print(f"erm serve: error: could not load the model: {exc}", file=sys.stderr, flush=True)
        userver.should_exit = True

    server.on_load_error = failed
    h, p = sock.getsockname()[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"
    if announce is not None:
        announce(url)
    # uvicorn handles SIGTERM/SIGINT (stop accepting, drain, shut down) and then raises the
    # signal again for the handler it found: a no-op one makes a drained stop exit normally
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {}
    if main_thread:
        for sig in (signal.SIGTERM, signal.SIGINT):
            saved[sig] = signal.signal(sig, lambda *_: None)
    try:
        userver.run(sockets=[sock])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        sock.close()
    return 1 if server.load_error is not None else 0


@contextlib.contextmanager
def running(rm, *, host: str = "127.0.0.1", timeout: float = 60.0,
            shutdown_timeout: float = SHUTDOWN_TIMEOUT, **kwargs):
    """Serve `rm` (as in `serve`) on a free port of `host` in a background thread; yields the
    base URL ("http://127.0.0.1:PORT") once /health answers 200, and shuts the server down (draining
    requests in flight, for at most `shutdown_timeout` seconds) on exit. Keyword arguments as in
    `make_app` and `RewardServer`."""
    _positive(shutdown_timeout, "shutdown_timeout")
    server, app_kw = _split(rm, kwargs)
    app = make_app(server, **app_kw)
    sock = _bind(host, 0)
    userver = _uvicorn_server(app, "warning", shutdown_timeout)
    thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="erm-serve-http")
    thread.start()
    url = f"http://{host}:{sock.getsockname()[1]}"
    t0 = time.monotonic()
    while not (userver.started and server.ready):
        if server.load_error is not None:
            userver.should_exit = True
            thread.join(timeout)
            raise RuntimeError(f"the model could not be loaded: {server.load_error}")
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            userver.should_exit = True
            raise RuntimeError("the reward server did not start")
        time.sleep(0.01)
    try:
        yield url
    finally:
        userver.should_exit = True
        thread.join(timeout)
        sock.close()
