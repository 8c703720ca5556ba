"""erm serve against hostile or careless clients (loopback only, tiny random model, CPU): whatever
a request holds it fails alone with a 4xx and the worker goes on; the body, pairs, response length
and queue are bounded; a client that went away is not scored; slow bodies time out and do not
hold up shutdown; the optional bearer token; no /docs unless asked; the command line refuses
limits that cannot work."""
import argparse
import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time

import pytest

import erm
from tests.test_serve import _close, rm  # noqa: F401  (rm: the fixture)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import erm.serve.app as serve_app  # noqa: E402
from erm.cli.serve import add_parser, server_kwargs  # noqa: E402
from erm.serve import RewardServer, make_app, running, serve  # noqa: E402
from erm.serve.app import exposure_warning  # noqa: E402

OK = {"prompts": ["What is 2+2?"], "responses": ["It is 4."]}


def _post(url, path, body, *, timeout=10, headers=None):
    """POST `body` as JSON with ASCII escapes (a lone surrogate travels as \\ud800, as valid
    JSON text; httpx's own json= would refuse to encode it)."""
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=timeout,
                      headers={"content-type": "application/json", **(headers or {})})


def _chat(rm, text="Hi"):
    return rm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)


def _raw(url, data: bytes) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(data)
    return sock


def _read_until_closed(sock, limit=5.0) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout past
    `limit` seconds)."""
    sock.settimeout(limit)
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def _half_body(n_declared=1000, sent=b'{"prompts": ["a"], ') -> bytes:
    return (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % n_declared) + sent


async def _until(cond, limit=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, "timed out waiting"
        await asyncio.sleep(0.01)


class Gated:
    """An EndoRM whose forward waits for `gate` (so requests pile up behind it); records the
    responses it encodes."""

    def __init__(self, rm):
        self.rm, self.encoded = rm, []
        self.entered, self.gate = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.rm, name)

    def encode(self, prompt, response, **kw):
        self.encoded.append(response)
        return self.rm.encode(prompt, response, **kw)

    def encoded_stats(self, encs):
        self.entered.set()
        assert self.gate.wait(20)
        return self.rm.encoded_stats(encs)


def test_a_lone_surrogate_fails_alone(rm):
    """The tokenizer raises on a lone surrogate: once that killed the worker for good."""
    with running(rm, max_batch_size=8, max_wait_ms=1) as url:
        text = _chat(rm)
        r = _post(url, "/get_reward", {"query": [text + "hi\ud800 there"], "prompts": [text]},
                  timeout=5)
        assert r.status_code == 422 and "query[0]" in r.json()["detail"], r.text
        assert "surrogate" in r.json()["detail"]
        r = _post(url, "/score", {"prompts": ["a"], "responses": ["hi\ud800 there"]})
        assert r.status_code == 422 and "responses[0]" in r.json()["detail"], r.text
        chat = [{"role": "user", "content": "\udfff"}]
        r = _post(url, "/score", {"prompts": [chat], "responses": ["x"]})
        assert r.status_code == 422 and "prompts[0][0].content" in r.json()["detail"], r.text
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        ok = _post(url, "/get_reward", {"query": [text + "It is 4.<|im_end|>"], "prompts": [text]})
        assert ok.status_code == 200, ok.text
        assert _close(ok.json()["rewards"], rm.score("Hi", "It is 4.").tolist())


def test_a_chat_template_that_raises_fails_alone(rm):
    """A "no system role" template raises in the worker for a chat with a system message: that
    request gets a 422 naming the pair and the template's message; the requests batched with it
    are scored, and later ones too."""
    from tests.tiny import CHATML_TEMPLATE, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{% endfor %}" + CHATML_TEMPLATE)
    strict = erm.EndoRM(rm.model, tok, alpha=0.9, max_length=64)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    bodies = [OK, {"prompts": ["Hi", system], "responses": ["Hello.", "Hi!"]},
              {"prompts": ["Name a capital."], "responses": ["Paris."]}]
    srv = RewardServer(strict, max_batch_size=16, max_wait_ms=300)
    with running(srv) as url:
        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                return await asyncio.gather(*[client.post("/score", json=b) for b in bodies])
        a, b, c = asyncio.run(go())
        assert [a.status_code, b.status_code, c.status_code] == [200, 422, 200], b.text
        assert "pair 1" in b.json()["detail"] and "System role not supported" in b.json()["detail"]
        assert srv.batches == 1                       # the three were one batch
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        again = httpx.post(url + "/score", json=OK, timeout=5)
        assert again.status_code == 200
    assert _close(a.json()["rewards"] + c.json()["rewards"] + again.json()["rewards"],
                  strict.score(["What is 2+2?", "Name a capital.", "What is 2+2?"],
                               ["It is 4.", "Paris.", "It is 4."]).tolist())


def test_health_is_503_once_the_worker_is_gone(rm):
    """No request can end the batching task; if it ends anyway, /health says so and requests get
    503 at once instead of waiting for ever."""
    srv = RewardServer(rm, max_wait_ms=1)
    with running(srv) as url:
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        task = srv._task
        task.get_loop().call_soon_threadsafe(task.cancel)
        t0 = time.monotonic()
        while httpx.get(url + "/health", timeout=5).status_code == 200:
            assert time.monotonic() - t0 < 5
            time.sleep(0.02)
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "error"
        r = httpx.post(url + "/score", json=OK, timeout=5)
        assert r.status_code == 503 and "worker" in r.json()["detail"]


def test_body_and_pairs_are_capped(rm):
    with running(rm, max_wait_ms=1, max_body_bytes=1024, max_pairs=4) as url:
        big = {"prompts": ["a"], "responses": ["b" * 2000]}
        r = httpx.post(url + "/score", json=big, timeout=5)
        assert r.status_code == 413 and "1024" in r.json()["detail"], r.text
        chunks = [b'{"prompts": ["a"], "responses": ["', b"b" * 2000, b'"]}']
        r = httpx.post(url + "/score", content=iter(chunks), timeout=5)   # chunked: counted
        assert r.status_code == 413, r.text
        five = {"prompts": ["a"] * 5, "responses": ["b"] * 5}
        r = httpx.post(url + "/score", json=five, timeout=5)
        assert r.status_code == 413 and "5 pairs" in r.json()["detail"], r.text
        four = {"prompts": ["a"] * 4, "responses": ["b"] * 4}
        r = httpx.post(url + "/score", json=four, timeout=5)
        assert r.status_code == 200 and _close(r.json()["rewards"],
                                               rm.score(["a"] * 4, ["b"] * 4).tolist())


def test_default_limits(rm):
    """16 MiB of body (refused from Content-Length alone, before any of it is read) and 4,096
    pairs per request."""
    srv = RewardServer(rm, max_wait_ms=1)
    assert srv.max_pairs == 4096
    with running(srv) as url:
        sock = _raw(url, _half_body(16 * 2 ** 20 + 1, b""))
        head = _read_until_closed(sock).split(b"\r\n")[0]
        assert b" 413 " in head, head
        sock.close()
        sock = _raw(url, _half_body(16 * 2 ** 20, b""))   # at the cap: waits for the body
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(100)
        sock.close()


def test_a_response_far_too_long_is_refused_before_tokenizing(rm, monkeypatch):
    seen = []
    tokenize = erm.lm.tokenize
    monkeypatch.setattr(erm.lm, "tokenize",
                        lambda tok, text, **kw: seen.append(len(text)) or tokenize(tok, text, **kw))
    long = "word " * 50_000                   # 250,000 characters, max_length 64 tokens
    text = _chat(rm)
    with running(rm, max_wait_ms=1) as url:
        r = httpx.post(url + "/score", json={"prompts": ["a"], "responses": [long]}, timeout=10)
        assert r.status_code == 422 and "pair 0" in r.json()["detail"], r.text
        assert "characters" in r.json()["detail"]
        r = httpx.post(url + "/get_reward", json={"query": [text + long], "prompts": [text]},
                       timeout=10)
        assert r.status_code == 422 and "query 0" in r.json()["detail"], r.text
        assert max(seen, default=0) < 1000    # the tokenizer never saw it
        r = httpx.post(url + "/score", json=OK, timeout=10)
        assert r.status_code == 200 and seen  # (the spy sees what is tokenized)


def test_a_full_queue_answers_429_with_retry_after(rm):
    gated = Gated(rm)
    srv = RewardServer(gated, max_batch_size=1, max_wait_ms=0, max_queue=3)
    body = lambda i: {"prompts": ["Q?"], "responses": [f"A{i}."]}  # noqa: E731
    with running(srv) as url:
        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = asyncio.ensure_future(client.post("/score", json=body(0)))
                await _until(gated.entered.is_set)            # the worker is busy with it
                waiting = [asyncio.ensure_future(client.post("/score", json=body(i)))
                           for i in (1, 2, 3)]
                await _until(lambda: srv.queued == 3)
                busy = await client.post("/score", json=body(4))
                gated.gate.set()
                return busy, await asyncio.gather(first, *waiting)
        busy, done = asyncio.run(go())
    assert busy.status_code == 429 and "busy" in busy.json()["detail"], busy.text
    assert int(busy.headers["retry-after"]) >= 1
    assert [r.status_code for r in done] == [200] * 4
    assert _close([r.json()["rewards"][0] for r in done],
                  rm.score(["Q?"] * 4, [f"A{i}." for i in range(4)]).tolist())


def test_a_client_that_went_away_is_not_scored(rm):
    gated = Gated(rm)
    srv = RewardServer(gated, max_batch_size=1, max_wait_ms=0)
    with running(srv) as url:
        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = asyncio.ensure_future(client.post("/score", json=OK))
                await _until(gated.entered.is_set)
                async with httpx.AsyncClient(base_url=url, timeout=0.3) as impatient:
                    with pytest.raises(httpx.ReadTimeout):
                        await impatient.post("/score", json={"prompts": ["Q?"],
                                                             "responses": ["gone"]})
                await _until(lambda: srv.skipped == 1)
                gated.gate.set()
                return await first, await client.post("/score", json=OK)
        first, after = asyncio.run(go())
    assert first.status_code == 200 and after.status_code == 200
    assert "gone" not in gated.encoded and srv.queued == 0


def test_a_slow_body_times_out(rm):
    with running(rm, max_wait_ms=1, read_timeout=0.5) as url:
        sock = _raw(url, _half_body())
        t0 = time.monotonic()
        answer = _read_until_closed(sock)     # the server answers, then closes
        sock.close()
        assert b" 408 " in answer.split(b"\r\n")[0] and b"read_timeout" in answer, answer
        assert time.monotonic() - t0 < 4
        assert httpx.post(url + "/score", json=OK, timeout=5).status_code == 200


def test_half_sent_bodies_do_not_hold_up_shutdown(rm):
    with running(rm, max_wait_ms=1, read_timeout=60, shutdown_timeout=0.5, timeout=15) as url:
        socks = [_raw(url, _half_body()) for _ in range(3)]
        time.sleep(0.2)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    with pytest.raises(OSError):                  # it no longer listens
        _raw(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for s in socks:                               # each was told, then closed
        answer = _read_until_closed(s)
        assert b" 503 " in answer.split(b"\r\n")[0] and b"shutting down" in answer, answer
        s.close()


def test_a_client_disconnecting_mid_upload_logs_one_info_line(rm, caplog):
    errors = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record)

    handler = Keep()
    logging.getLogger("uvicorn.error").addHandler(handler)
    caplog.set_level(logging.INFO, logger="erm.serve")
    try:
        with running(rm, max_wait_ms=1) as url:
            sock = _raw(url, _half_body(1000, b'{"prompts": '))
            time.sleep(0.2)
            sock.close()
            t0 = time.monotonic()
            while not any("disconnected" in r.getMessage() for r in caplog.records):
                assert time.monotonic() - t0 < 5, caplog.records
                time.sleep(0.02)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not errors, [r.getMessage() for r in errors]
    ours = [r for r in caplog.records if r.name == "erm.serve"]
    assert len(ours) == 1 and ours[0].levelno == logging.INFO, ours
    msg = ours[0].getMessage()
    assert "\n" not in msg and "12 bytes received of 1000" in msg, msg


def test_deeply_nested_json_is_a_400(rm):
    with running(rm, max_wait_ms=1) as url:
        deep = b"[" * 100_000 + b"]" * 100_000
        r = httpx.post(url + "/score", content=deep, timeout=10)
        assert r.status_code == 400 and "nested" in r.json()["detail"], r.text
        nested = "[" * 500 + "]" * 500
        for body in ('{"prompts": %s, "responses": ["x"]}' % nested,
                     '{"prompts": ["a"], "responses": ["x"], "terminated": [%s]}' % nested,
                     '{"prompts": ["a"], "responses": ["x"], "reduction": %s}' % nested):
            r = httpx.post(url + "/score", content=body.encode(), timeout=10)
            assert r.status_code == 422 and len(r.json()["detail"]) < 300, r.text
        assert httpx.post(url + "/score", json=OK, timeout=5).status_code == 200


def test_bearer_token(rm, monkeypatch):
    compared = []
    compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or compare(a, b))
    text = _chat(rm)
    with running(rm, max_wait_ms=1, api_key="s3cret") as url:
        r = httpx.post(url + "/score", json=OK, timeout=5)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        for auth in ("Bearer nope", "Bearer s3cre", "s3cret", "Basic s3cret"):
            r = httpx.post(url + "/score", json=OK, headers={"Authorization": auth}, timeout=5)
            assert r.status_code == 401, auth
        r = httpx.post(url + "/get_reward", json={"query": [text + "Yes."], "prompts": [text]},
                       timeout=5)
        assert r.status_code == 401
        assert compared                                   # the constant-time comparison
        r = httpx.post(url + "/score", json=OK, headers={"Authorization": "Bearer s3cret"},
                       timeout=5)
        assert r.status_code == 200, r.text
        assert httpx.get(url + "/health", timeout=5).status_code == 200   # open to probes
    with pytest.raises(ValueError):
        make_app(rm, api_key="")


def test_docs_are_off_unless_asked(rm):
    with running(rm, max_wait_ms=1) as url:
        assert httpx.get(url + "/docs", timeout=5).status_code == 404
        assert httpx.get(url + "/openapi.json", timeout=5).status_code == 404
    with running(rm, max_wait_ms=1, docs=True) as url:
        assert httpx.get(url + "/docs", timeout=5).status_code == 200
        assert "/score" in httpx.get(url + "/openapi.json", timeout=5).json()["paths"]


def test_a_public_address_without_a_key_warns(rm, monkeypatch, capsys):
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert exposure_warning(host, None) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        assert "API key" in exposure_warning(host, None), host
        assert exposure_warning(host, "key") is None

    def no_bind(host, port):
        raise OSError("not bound in tests")

    monkeypatch.setattr(serve_app, "_bind", no_bind)       # nothing is bound
    with pytest.raises(OSError, match="not bound"):
        serve(rm, "0.0.0.0", 0)
    err = capsys.readouterr().err
    assert "erm serve: warning: listening on 0.0.0.0 without an API key" in err


def _parser():
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    return p


def test_the_command_line_limits(rm, monkeypatch):
    p = _parser()
    for bad in (["--max-wait-ms", "inf"], ["--max-wait-ms", "nan"], ["--max-wait-ms", "-1"],
                ["--read-timeout", "0"], ["--shutdown-timeout", "inf"], ["--max-body-mb", "0"],
                ["--max-pairs", "0"], ["--max-queue", "0"]):
        with pytest.raises(SystemExit):
            p.parse_args(["serve", *bad])
    for bad in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="max_wait_ms"):
            RewardServer(rm, max_wait_ms=bad)
    monkeypatch.setenv("ERM_API_KEY", "from-env")
    kw = server_kwargs(p.parse_args(["serve"]))
    assert kw["api_key"] == "from-env" and not kw["docs"]
    assert kw["max_body_bytes"] == 16 * 2 ** 20 and kw["max_pairs"] == 4096
    args = p.parse_args(["serve", "--api-key", "given", "--max-body-mb", "0.5", "--max-pairs",
                         "8", "--max-queue", "64", "--read-timeout", "2", "--shutdown-timeout",
                         "3", "--docs", "--max-wait-ms", "0"])
    kw = server_kwargs(args)
    assert kw["api_key"] == "given" and kw["docs"] and kw["max_body_bytes"] == 2 ** 19
    assert (kw["max_pairs"], kw["max_queue"], kw["read_timeout"], kw["shutdown_timeout"],
            kw["max_wait_ms"]) == (8, 64, 2.0, 3.0, 0.0)
    seen = {}
    monkeypatch.setattr(erm.serve, "serve", lambda rm, host, port, **kw: seen.update(kw) or 0)
    assert args.func(args, rm) == 0
    assert seen["api_key"] == "given" and seen["max_queue"] == 64 and seen["max_pairs"] == 8
