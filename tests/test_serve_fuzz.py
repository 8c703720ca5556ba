"""erm serve driven by generated bodies (hypothesis, derandomized: the same cases every run, a
bounded number of them, each test stopping early past a time budget), on one server over loopback
HTTP: every answer is a 2xx equal to scoring in-process (for /score, `EndoRM.response_rewards`
reduced as `EndoRM.score` does; for /get_reward, its documented tokenization scored one pair at a
time) or a 4xx with a message, never a 5xx or a hang; afterwards the server still answers, and
correctly. Bodies mix good items with a bad one (a lone surrogate, a control character, special
token text, a response too long), junk values, broken JSON and deep nesting."""
import json
import time
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import erm.model
from erm import lm
from tests.test_serve import _close, rm  # noqa: F401  (rm: the fixture)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from erm.serve import RewardServer, running  # noqa: E402

BUDGET_S = 8.0          # per test: examples past it pass without a request
SEEN: Counter = Counter()   # (test, status // 100) -> answers


def _settings(n):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz(rm):
    srv = RewardServer(rm, max_batch_size=4, max_wait_ms=1, max_pairs=6)
    with running(srv, max_body_bytes=32 * 1024) as url:
        with httpx.Client(base_url=url, timeout=20) as client:
            yield client, srv


class Budget:
    def __init__(self):
        self.stop = None

    def spent(self) -> bool:
        if self.stop is None:
            self.stop = time.monotonic() + BUDGET_S
        return time.monotonic() > self.stop


# ------------------------------------------------------------------------------- strategies
def sometimes(bits=3):
    """True about one time in 2**bits (all of `bits` coin flips)."""
    return st.tuples(*[st.booleans()] * bits).map(all)


def rare(bad, good, bits=3):
    """`bad` about one time in 2**bits, else `good`."""
    return sometimes(bits).flatmap(lambda b: bad if b else good)


_SAFE = ["a", "b", " ", "\n", "Paris", "It is 4.", "é", "中文", "🙂", "\t", "{", '"', "\\",
         "?"]
_RISKY = ["\ud800", "\udfff", "\x00", "<|im_end|>", "<|im_start|>", "<pad>", "<|endoftext|>",
          "\u200b", "\r\n"]
safe_texts = st.lists(st.sampled_from(_SAFE), max_size=10).map("".join)
risky_texts = st.tuples(safe_texts, st.sampled_from(_RISKY), safe_texts).map("".join)
long_texts = st.integers(20, 300).map(lambda k: "word " * k)              # cut, or refused
texts = rare(long_texts, rare(risky_texts, safe_texts), 4)
junk = st.one_of(st.none(), st.integers(-2, 2), st.floats(allow_nan=False), st.booleans(),
                 st.dictionaries(st.sampled_from(["role", "content", "x"]), texts, max_size=2),
                 st.lists(st.integers(), max_size=2))
roles = rare(st.one_of(texts, st.integers()), st.sampled_from(["user", "system", "assistant"]))
messages = rare(junk, st.fixed_dictionaries({"role": roles, "content": texts},
                                            optional={"name": texts}), 4)
prompts = rare(junk, st.one_of(texts, st.lists(messages, min_size=1, max_size=3)), 4)
responses = rare(st.one_of(junk, texts), texts.map(lambda t: t if t.strip() else t + "ok"), 4)


@st.composite
def score_bodies(draw):
    n = draw(rare(st.just(0), st.integers(1, 7), 4))
    m = draw(st.integers(0, 7)) if draw(sometimes()) else n
    body = {"prompts": draw(st.lists(prompts, min_size=n, max_size=n)),
            "responses": draw(st.lists(responses, min_size=m, max_size=m))}
    if m and draw(sometimes(2)):        # one bad item among good ones
        body["responses"][draw(st.integers(0, m - 1))] = draw(st.one_of(risky_texts, long_texts))
    if draw(st.booleans()):
        body["reduction"] = draw(rare(st.sampled_from(["max", 1, None]),
                                      st.sampled_from(["sum", "mean"])))
    if draw(st.booleans()):
        body["terminated"] = draw(rare(st.one_of(st.lists(st.integers(0, 1), max_size=3), junk),
                                       st.one_of(st.booleans(), st.lists(
                                           st.booleans(), min_size=n, max_size=n))))
    if draw(st.booleans()):
        body["token_rewards"] = draw(rare(junk, st.booleans()))
    if draw(sometimes(3)):
        body[draw(st.sampled_from(["temperature", "labels", "query"]))] = draw(junk)
    if draw(sometimes(4)):
        return draw(st.one_of(junk, st.lists(junk, max_size=2)))
    return body


def _chatml(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@st.composite
def get_reward_bodies(draw):
    n = draw(rare(st.just(0), st.integers(1, 7), 4))
    ps, qs = [], []
    for _ in range(n):
        p = draw(st.one_of(safe_texts.map(_chatml), texts))
        r = draw(st.one_of(safe_texts, safe_texts.map(lambda t: t + "<|im_end|>"),
                           texts.map(lambda t: t + "<pad><pad>"), texts))
        ps.append(p)
        qs.append(draw(texts) if draw(sometimes(4)) else p + r)   # sometimes no prefix
    if n and draw(sometimes(2)):        # one bad item among good ones
        k = draw(st.integers(0, n - 1))
        qs[k] = ps[k] + draw(st.one_of(risky_texts, long_texts))
    body = {"query": qs, "prompts": ps}
    if draw(st.booleans()):
        body["labels"] = draw(st.lists(junk, max_size=n))
    if draw(sometimes(3)):
        body.pop(draw(st.sampled_from(["query", "prompts"])))
    if draw(sometimes(3)):
        body[draw(st.sampled_from(["query", "prompts"]))] = draw(st.one_of(junk, st.lists(junk)))
    if draw(sometimes(4)):
        return draw(st.one_of(junk, st.lists(texts, max_size=2)))
    return body


raw_bodies = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"", b"null", b"[]", b"{}", b"[" * 5000, b"{" * 3000, b"\xff\xfe{}",
                     b'{"prompts": ["a"], "responses": ["b"]', b'{"prompts": ["a"], '
                     b'"responses": ["b"], "prompts": ["c", "d"]}', b'"\\ud800"',
                     b'{"prompts": ["a"], "responses": ["b"], "reduction": NaN}',
                     b'{"prompts": [1e999], "responses": ["b"]}', b"[" * 200 + b"]" * 200,
                     b"1" * 5000, b"x" * (40 * 1024)]),
    score_bodies().map(lambda b: json.dumps(b).encode()[:-1]))             # cut short


# ------------------------------------------------------------------------------- references
def _score_reference(rm, body):
    """(rewards, sum rewards, prompt_truncated) of a /score body scored in-process."""
    term = body.get("terminated", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lm.TruncationWarning)
        sums, n = rm.response_rewards(body["prompts"], body["responses"], terminated=term)
    want = erm.model.reduce_rewards(sums, n, body.get("reduction", "sum"))
    flags = term if isinstance(term, list) else [term] * len(body["responses"])
    cut = [rm.encode(p, r, terminated=t).n_cut > 0
           for p, r, t in zip(body["prompts"], body["responses"], flags)]
    return want.tolist(), sums.tolist(), cut


def _get_reward_reference(rm, body):
    """Sum rewards of a /get_reward body as documented: each response (the query after its
    prompt) and prompt tokenized as they are, trailing padding dropped, a finished turn when it
    ends with an end token; scored alone, one pair per forward."""
    tok, ends = rm.tokenizer, set(rm.end_ids)
    pad = lm.pad_id(tok, rm.end_ids)
    out = []
    for p, q in zip(body["prompts"], body["query"]):
        ids = lm.tokenize(tok, q[len(p):])[0]
        while ids and ids[-1] == pad and pad not in ends:
            ids.pop()
        if not ids:
            out.append(0.0)
            continue
        enc = lm.join_context(tok, lm.tokenize(tok, p)[0], ids, end_ids=rm.end_ids,
                              max_length=rm.max_length, terminated=ids[-1] in ends)
        out.append(float(rm.encoded_stats([enc])[0][0].sum(dtype=torch.float64)))
    return out


def _check(rm, srv, client, path: str, raw: bytes, source: str):
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert srv.alive
    SEEN[source, r.status_code // 100] += 1
    if r.status_code != 200:
        assert 400 <= r.status_code < 500, (r.status_code, r.text, raw[:300])
        assert isinstance(r.json()["detail"], str) and len(r.json()["detail"]) < 1000
        return
    body, out = json.loads(raw), r.json()
    if path == "/score":
        want, sums, cut = _score_reference(rm, body)
        assert out["prompt_truncated"] == cut
        if body.get("token_rewards"):
            assert _close([sum(t) for t in out["token_rewards"]], sums)
    else:
        want = _get_reward_reference(rm, body)
        assert out["scores"] == out["rewards"]
        assert len(out["extra_logs"]["prompt_truncated"]) == len(want)
    assert _close(out["rewards"], want), (out, want, raw[:300])


_score_budget, _reward_budget, _raw_budget = Budget(), Budget(), Budget()


def _post(budget: Budget, fuzz, rm, path: str, raw: bytes, source: str):
    """`_check` one generated body on the server of `fuzz`, unless `budget` is spent."""
    if budget.spent():
        return
    client, srv = fuzz
    _check(rm, srv, client, path, raw, source)


@_settings(70)
@given(body=score_bodies())
def test_score_bodies(fuzz, rm, body):
    _post(_score_budget, fuzz, rm, "/score", json.dumps(body).encode(), "score")


@_settings(60)
@given(body=get_reward_bodies())
def test_get_reward_bodies(fuzz, rm, body):
    _post(_reward_budget, fuzz, rm, "/get_reward", json.dumps(body).encode(), "get_reward")


@_settings(50)
@given(path=st.sampled_from(["/score", "/get_reward"]), raw=raw_bodies)
def test_raw_bodies(fuzz, rm, path, raw):
    _post(_raw_budget, fuzz, rm, path, raw, "raw")


def test_the_server_still_answers_afterwards(fuzz, rm):
    client, srv = fuzz
    assert client.get("/health").json()["status"] == "ok" and srv.alive and srv.queued == 0
    r = client.post("/score", json={"prompts": ["What is 2+2?"], "responses": ["It is 4."]})
    assert r.status_code == 200 and _close(r.json()["rewards"],
                                           rm.score("What is 2+2?", "It is 4.").tolist())
    # the generated bodies of each test that ran were not all refused, nor all accepted
    for source in ("score", "get_reward"):
        if SEEN[source, 2] + SEEN[source, 4]:
            assert SEEN[source, 2] >= 5 and SEEN[source, 4] >= 5, SEEN
