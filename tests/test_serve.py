"""erm serve: the reward server over real HTTP on a loopback port (tiny random model, CPU)."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import erm
from tests.tiny import tiny_model_and_tokenizer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from erm.cli.serve import add_parser  # noqa: E402
from erm.serve import RewardServer, running  # noqa: E402

PROMPTS = ["What is 2+2?", "Name a capital.", [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hello?"}]]
RESPONSES = ["It is 4.", "Paris is the capital of France.", "Hi! How can I help?"]


@pytest.fixture(scope="module")
def rm(one_thread):
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    return erm.EndoRM(model, tok, alpha=0.9, max_length=64)


@pytest.fixture(scope="module")
def server(rm):
    srv = RewardServer(rm, max_batch_size=8, max_wait_ms=20)
    with running(srv) as url:
        yield url, srv


def _close(a, b):
    return a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_score_equals_endorm_in_process(server, rm):
    url, _ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    r = httpx.post(url + "/score", json={"prompts": PROMPTS, "responses": RESPONSES})
    assert r.status_code == 200, r.text
    assert _close(r.json()["rewards"], rm.score(PROMPTS, RESPONSES).tolist())
    body = {"prompts": PROMPTS, "responses": RESPONSES, "reduction": "mean",
            "token_rewards": True, "terminated": [True, False, True]}
    out = httpx.post(url + "/score", json=body).json()
    want = rm.score(PROMPTS, RESPONSES, reduction="mean", terminated=[True, False, True])
    assert _close(out["rewards"], want.tolist())
    sums = rm.score(PROMPTS, RESPONSES, terminated=[True, False, True])
    for toks, s, p, resp, t in zip(out["token_rewards"], sums.tolist(), PROMPTS, RESPONSES,
                                   [True, False, True]):
        assert _close(sum(toks), s)
        if t:
            assert _close(toks, rm.token_rewards(p, resp).rewards.tolist())


def test_openrlhf_get_reward(server, rm):
    """The body OpenRLHF's SingleTurnAgentExecutor posts: query = decoded prompt + response
    (special tokens kept), prompts = the rendered prompt text, labels."""
    url, _ = server
    tok = rm.tokenizer
    msgs = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Hi"}]]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    queries = [texts[0] + "It is 4.<|im_end|>", texts[1] + "Hello, how are"]   # 2nd: cut off
    r = httpx.post(url + "/get_reward", json={"query": queries, "prompts": texts,
                                              "labels": ["4", None]})
    assert r.status_code == 200, r.text
    out = r.json()
    want = rm.score(msgs, ["It is 4.", "Hello, how are"], terminated=[True, False]).tolist()
    assert _close(out["rewards"], want) and out["scores"] == out["rewards"]
    assert out["extra_logs"]["terminated"] == [1, 0]
    assert out["extra_logs"]["response_tokens"][0] == len(rm.token_rewards(msgs[0], "It is 4."))
    # an empty response scores 0; the prompt is required and must prefix the query
    assert httpx.post(url + "/get_reward", json={"query": [texts[0]], "prompts": [texts[0]]}
                      ).json()["rewards"] == [0.0]
    assert httpx.post(url + "/get_reward", json={"query": queries}).status_code == 422
    bad = httpx.post(url + "/get_reward", json={"query": ["abc"], "prompts": ["xyz"]})
    assert bad.status_code == 422 and "does not start with" in bad.json()["detail"]


def test_cut_prompts_are_flagged_per_item_and_logged(server, rm, caplog):
    """A prompt longer than max_length allows is cut from the left: the answer says which (and
    /get_reward in extra_logs, which OpenRLHF logs) and the server logs a warning per request."""
    url, _ = server
    long = "word " * 100                                          # > max_length=64 tokens
    caplog.set_level("WARNING", logger="erm.serve")
    out = httpx.post(url + "/score", json={"prompts": ["Hi", long], "responses": ["a.", "b."]})
    assert out.status_code == 200, out.text
    with pytest.warns(erm.lm.TruncationWarning):
        want = rm.score(["Hi", long], ["a.", "b."]).tolist()
    assert _close(out.json()["rewards"], want)
    assert out.json()["prompt_truncated"] == [False, True]
    ok = httpx.post(url + "/score", json={"prompts": ["Hi"], "responses": ["a."]}).json()
    assert ok["prompt_truncated"] == [False]
    cut = [r for r in caplog.records if r.name == "erm.serve" and r.levelname == "WARNING"]
    assert len(cut) == 1 and "1 of 2 prompt(s)" in cut[0].getMessage(), cut
    assert "max_length=64" in cut[0].getMessage() and "/score" in cut[0].getMessage()

    texts = [rm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in (long, "Hi")]
    body = {"query": [texts[0] + "It is.<|im_end|>", texts[1] + "Yes.<|im_end|>"],
            "prompts": texts}
    caplog.clear()
    out = httpx.post(url + "/get_reward", json=body).json()
    assert out["extra_logs"]["prompt_truncated"] == [1, 0]
    cut = [r for r in caplog.records if r.name == "erm.serve" and r.levelname == "WARNING"]
    assert len(cut) == 1 and "1 of 2 prompt(s)" in cut[0].getMessage()
    assert "/get_reward" in cut[0].getMessage()


def test_64_concurrent_requests_are_batched_and_answered_in_order(server, rm):
    url, srv = server
    words = ["Paris", "four", "blue", "Berlin is big", "no", "yes, it is"]
    bodies = [{"prompts": [f"Question {i}?", "Say something."],
               "responses": [words[i % 6] + ".", f"Answer {i}."]} for i in range(64)]
    flat_p = [p for b in bodies for p in b["prompts"]]
    flat_r = [r for b in bodies for r in b["responses"]]
    want = rm.score(flat_p, flat_r).tolist()
    before = srv.batches

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/score", json=b) for b in bodies])

    answers = asyncio.run(go())
    assert all(a.status_code == 200 for a in answers)
    got = [x for a in answers for x in a.json()["rewards"]]
    assert _close(got, want)
    assert srv.batches - before < 64           # requests were scored together (≤ 8 pairs each)


def test_malformed_bodies_get_4xx_and_the_server_keeps_serving(server, rm):
    url, _ = server
    post = lambda path, **kw: httpx.post(url + path, **kw)  # noqa: E731
    cases = [
        (dict(content=b"{not json"), 400, "not valid JSON"),
        (dict(json=[1, 2]), 422, "JSON object"),
        (dict(json={"responses": ["x"]}), 422, "'prompts'"),
        (dict(json={"prompts": ["a", "b"], "responses": ["x"]}), 422, "2 prompts but 1"),
        (dict(json={"prompts": ["a"], "responses": ["  "]}), 422, "responses[0] is empty"),
        (dict(json={"prompts": ["a"], "responses": [3]}), 422, "responses[0]"),
        (dict(json={"prompts": [[{"role": "user"}]], "responses": ["x"]}), 422, "prompts[0]"),
        (dict(json={"prompts": ["a"], "responses": ["x"], "reduction": "max"}), 422, "reduction"),
        (dict(json={"prompts": ["a"], "responses": ["x"], "terminated": [1]}), 422, "terminated"),
        (dict(json={"prompts": ["a"], "responses": ["x"], "temperature": 2}), 422, "unknown"),
        (dict(json={"prompts": [], "responses": []}), 422, "empty"),
        (dict(json={"prompts": ["a"], "responses": ["word " * 200]}), 422, "pair 0"),  # too long
    ]
    for kw, status, text in cases:
        r = post("/score", **kw)
        assert r.status_code == status and text in r.json()["detail"], (kw, r.text)
    ok = post("/score", json={"prompts": ["a"], "responses": ["b"]})
    assert ok.status_code == 200 and _close(ok.json()["rewards"], rm.score("a", "b").tolist())
    assert httpx.get(url + "/nope").status_code == 404


def test_a_bad_pair_fails_only_its_own_request(rm):
    """Requests batched together: one that cannot be encoded gets 422, the others their scores."""
    srv = RewardServer(rm, max_batch_size=64, max_wait_ms=300)
    bodies = [{"prompts": ["a"], "responses": ["b"]},
              {"prompts": ["a"], "responses": ["word " * 200]},
              {"prompts": ["c"], "responses": ["d"]}]
    with running(srv) as url:
        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*[client.post("/score", json=b) for b in bodies])
        a, b, c = asyncio.run(go())
    assert srv.batches == 1
    assert [a.status_code, b.status_code, c.status_code] == [200, 422, 200]
    want = rm.score(["a", "c"], ["b", "d"]).tolist()
    assert _close(a.json()["rewards"] + c.json()["rewards"], want)


def test_cli_parser():
    import argparse
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_parser(sub)
    args = p.parse_args(["serve", "--port", "0", "--max-batch-size", "4", "--alpha", "0.5"])
    assert args.func.__name__ == "_run" and args.port == 0 and args.max_batch_size == 4
    assert args.host == "127.0.0.1" and args.alpha == 0.5 and args.reduction == "sum"
    for bad in (["serve", "--max-batch-size", "0"], ["serve", "--port", "70000"],
                ["serve", "--alpha", "-1"], ["serve", "--alpha", "1e-5"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_sigterm_drains_requests_in_flight(tmp_path, rm):
    """A server process (python -m erm.serve --model DIR): requests already received when SIGTERM
    arrives are all answered, then it exits 0 — within --shutdown-timeout even though clients
    that sent half a body keep their connections open."""
    model_dir = tmp_path / "tiny"
    rm.model.save_pretrained(model_dir)
    rm.tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "erm.serve", "--model", str(model_dir),
                             "--port", "0", "--alpha", "0.9", "--max-length", "64",
                             "--max-wait-ms", "1500", "--max-batch-size", "64",
                             "--shutdown-timeout", "5", "--read-timeout", "120"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        t0 = time.monotonic()
        while url is None and time.monotonic() - t0 < 60:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if "listening on" in line:
                url = line.split("listening on ")[1].split()[0]
        assert url, "the server did not start"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        while time.monotonic() - t0 < 60:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        results = [None] * 8

        def call(i):
            results[i] = httpx.post(url + "/score", timeout=60,
                                    json={"prompts": [f"Q{i}?"], "responses": [f"A{i}."]})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        host, port = url.split("//")[1].split(":")
        stalled = [socket.create_connection((host, int(port)), timeout=5) for _ in range(3)]
        for sock in stalled:                 # headers and half a body, then nothing
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
                         b"\r\n{\"prompts\": ")
        time.sleep(0.5)                      # all received, waiting to be batched (1.5 s)
        proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        for t in threads:
            t.join(60)
        assert proc.wait(30) == 0
        assert time.monotonic() - t_term < 15           # the drain is bounded (5 s)
        for sock in stalled:
            sock.close()
        assert all(r is not None and r.status_code == 200 for r in results)
        got = [r.json()["rewards"][0] for r in results]
        assert _close(got, rm.score([f"Q{i}?" for i in range(8)],
                                    [f"A{i}." for i in range(8)]).tolist())
        with pytest.raises(httpx.TransportError):   # and it no longer listens
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
