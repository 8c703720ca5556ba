"""The bench scripts stay runnable: a tiny CPU run of each (numbers are not checked here)."""
import importlib.util
import pathlib


BENCHES = pathlib.Path(__file__).resolve().parents[1] / "benches"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has(module):
    return importlib.util.find_spec(module) is not None


def test_bench_token_stats_smoke(capsys, tmp_path):
    import json
    import os

    png, out = tmp_path / "ratios.png", tmp_path / "ts.json"
    rows = _load("bench_token_stats").main(
        ["--device", "cpu", "--n", "8", "--v", "500", "--dtype", "float32", "--reps", "2", "--no-compile",
         "--plot", str(png), "--json", str(out)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [r["name"] for r in rows]
    assert "erm (torch)" in names and "torch eager" in names
    if _has("trl") and os.environ.get("TRITON_INTERPRET") == "1":  # TRL's own Triton kernel
        assert "trl selective_log_softmax_and_entropy (no lse)" in names
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)
    assert "| op |" in capsys.readouterr().out
    got = json.loads(out.read_text())
    assert {"device", "date", "versions", "floors"} <= set(got["meta"])
    assert got["meta"]["floors"]["fwd_ms"] > 0 and "torch" in got["meta"]["versions"]
    assert [r["name"] for r in got["rows"]] == names


def test_bench_score_smoke(capsys, tmp_path):
    import json

    out = tmp_path / "score.json"
    rows = _load("bench_score").main(
        ["--device", "cpu", "--dtype", "float32", "--layers", "1", "--hidden", "32", "--heads", "4",
         "--kv-heads", "2", "--intermediate", "64", "--vocab", "500", "--pairs", "2", "--seq", "48",
         "--reps", "1", "--json", str(out)])
    assert [r["name"] for r in rows] == ["EndoRM.score (fused LM head)", "EndoRM.score (logits)"]
    assert all(r["ms"] > 0 and r["tok_s"] > 0 for r in rows)
    meta = json.loads(out.read_text())["meta"]
    assert meta["tokens"] >= 2 * 24 and meta["max_rel_diff"] < 1e-4
    assert "| path |" in capsys.readouterr().out


def test_sanitize_cases_smoke(capsys):
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        import pytest
        pytest.skip("the CPU run of the Triton cases needs TRITON_INTERPRET=1")
    rc = _load("sanitize_cases").main(["--device", "cpu", "--backends", "triton",
                                       "--cases", "token_stats"])
    out = capsys.readouterr().out
    assert rc == 0 and "all cases matched" in out and "token_stats N=64 V=1000 triton grad" in out


def test_benches_import_nothing_from_tests():
    import re

    for path in BENCHES.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from tests[ .]|import tests\b)", text, re.M), path.name


def test_bench_rl_step_smoke(capsys):
    import math

    rows = _load("bench_rl_step").main(
        ["--device", "cpu", "--dtype", "float32", "--layers", "1", "--hidden", "32", "--heads", "4",
         "--kv-heads", "2", "--intermediate", "64", "--vocab", "500", "--batch", "2", "--seq", "16",
         "--reps", "2", "--warmup", "1"])
    assert [r["name"].split()[0] for r in rows] == ["fused", "plain"]
    for r in rows:
        assert r["ms"] > 0 and r["tok_s"] > 0
        if pathlib.Path("/proc/self/clear_refs").exists():
            assert math.isfinite(r["peak_gib"]) and r["peak_gib"] > 0
    out = capsys.readouterr().out
    assert "| path |" in out and "rel. diff" in out
