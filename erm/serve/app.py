"""The reward server's HTTP side: `make_app` (the FastAPI app: /health, /score, /get_reward),
`serve` (until SIGTERM / Ctrl-C, draining the requests in flight) and `running` (a server on a
free loopback port in a thread, for tests and notebooks)."""
import contextlib
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

from .batcher import RewardServer
from .protocol import RequestError, parse_get_reward, parse_score


def make_app(rm, **kwargs):
    """A FastAPI app serving `rm` (an `erm.EndoRM` or a callable returning one); keyword
    arguments as in `RewardServer`. The server object is `app.state.server`."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    server = rm if isinstance(rm, RewardServer) else RewardServer(rm, **kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="erm reward server", lifespan=lifespan,
                  description="Endogenous rewards of a causal LM (erm).")
    app.state.server = server

    async def body_of(request: Request):
        raw = await request.body()
        try:
            import json
            return json.loads(raw)
        except ValueError:
            raise HTTPException(400, "the body is not valid JSON") from None

    async def answer(job_of, request: Request):
        body = await body_of(request)
        try:
            job = job_of(body)
            return JSONResponse(await server.submit(job))
        except RequestError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @app.get("/health")
    async def health():
        if server.load_error is not None:
            return JSONResponse({"status": "error", "detail": str(server.load_error)}, 503)
        if not server.ready:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ok", "model": server.name, "max_batch_size": server.max_batch_size}

    @app.post("/score")
    async def score(request: Request):
        return await answer(parse_score, request)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        return await answer(parse_get_reward, request)

    return app


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


def _uvicorn_server(app, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug",
                            lifespan="on", timeout_graceful_shutdown=None)
    return uvicorn.Server(config)


def serve(rm, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
          announce: Optional[Callable[[str], None]] = None, **kwargs) -> int:
    """Serve `rm` (an EndoRM, a callable returning one, or a `RewardServer`) until SIGTERM /
    Ctrl-C; returns the exit status (1 when the model failed to load). `announce(url)` is called
    once the port is bound (port 0 picks a free one). Other keyword arguments as in
    `RewardServer`."""
    server = rm if isinstance(rm, RewardServer) else RewardServer(rm, **kwargs)
    app = make_app(server)
    sock = _bind(host, port)
    userver = _uvicorn_server(app, log_level)

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
def running(rm, *, host: str = "127.0.0.1", timeout: float = 60.0, **kwargs):
    """Serve `rm` (as in `serve`) on a free port of `host` in a background thread; yields the
    base URL ("http://127.0.0.1:PORT") once /health answers 200, and shuts the server down (draining
    requests in flight) on exit. Keyword arguments as in `RewardServer`."""
    server = rm if isinstance(rm, RewardServer) else RewardServer(rm, **kwargs)
    app = make_app(server)
    sock = _bind(host, 0)
    userver = _uvicorn_server(app, "warning")
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
