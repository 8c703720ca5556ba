"""The bench scripts stay runnable: a tiny CPU run of each (numbers are not checked here)."""
import importlib.util
import pathlib


BENCHES = pathlib.Path(__file__).resolve().parents[1] / "benches"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_token_stats_smoke(capsys, tmp_path):
    png = tmp_path / "ratios.png"
    rows = _load("bench_token_stats").main(
        ["--device", "cpu", "--n", "8", "--v", "500", "--dtype", "float32", "--reps", "2", "--no-compile",
         "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [r["name"] for r in rows]
    assert "erm (torch)" in names and "torch eager" in names
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)
    assert "| op |" in capsys.readouterr().out


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
