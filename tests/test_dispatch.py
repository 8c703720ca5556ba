"""Backend choice: explicit names, ERM_BACKEND, and the measured cuda-vs-triton pick of "auto"."""
import logging
import time

import pytest
import torch

from erm import dispatch


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(dispatch, "_FASTEST", {})
    monkeypatch.delenv("ERM_BACKEND", raising=False)
    monkeypatch.delenv("ERM_MEASURE", raising=False)


def test_fastest_picks_the_quicker_and_caches(caplog):
    calls = {"slow": 0, "quick": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.004)

    def quick():
        calls["quick"] += 1

    dispatch.log.setLevel(logging.DEBUG)
    with caplog.at_level(logging.DEBUG, logger="erm"):
        assert dispatch.fastest("k", {"slow": slow, "quick": quick}, reps=3) == "quick"
    assert calls == {"slow": 4, "quick": 4}  # one warm-up + 3 timed each
    assert "measured" in caplog.text and "-> quick" in caplog.text
    assert dispatch.fastest("k", {"slow": slow, "quick": quick}) == "quick"
    assert calls == {"slow": 4, "quick": 4}  # cached: nothing re-run


def test_fastest_skips_a_failing_runner():
    def boom():
        raise RuntimeError("no kernel for this shape")

    assert dispatch.fastest("k2", {"cuda": boom, "triton": lambda: None}) == "triton"


def _table(calls=None):
    """A backend table whose entries say who they are (and count their loads)."""
    def entry(name):
        def load():
            if calls is not None:
                calls.append(name)
            return (f"{name}.fwd", f"{name}.bwd")
        return load
    return {"torch": entry("torch"), "triton": entry("triton"), "cuda": entry("cuda")}


def test_select_measures_only_for_auto_with_both_backends(monkeypatch):
    monkeypatch.setattr(dispatch, "cuda_extension", lambda: object())
    monkeypatch.setattr(dispatch, "_has_triton", lambda: True)
    built = []

    def measure(pair):
        built.append(pair)
        return (lambda: time.sleep(0.003)) if pair[0] == "cuda.fwd" else (lambda: None)

    cuda = torch.device("cuda")
    assert dispatch.select(_table(), "auto", cuda, torch.bfloat16, key="k",
                           measure=measure) == ("triton", ("triton.fwd", "triton.bwd"))
    assert built == [("cuda.fwd", "cuda.bwd"), ("triton.fwd", "triton.bwd")]
    # a backward without a measure reuses the forward's choice; no key: the cuda default
    assert dispatch.select(_table(), "auto", cuda, torch.bfloat16, key="k")[0] == "triton"
    assert dispatch.select(_table(), "auto", cuda, torch.bfloat16)[0] == "cuda"
    assert dispatch.select(_table(), "cuda", cuda, torch.bfloat16, key="k2",
                           measure=measure)[0] == "cuda"  # explicit: never measured
    monkeypatch.setenv("ERM_MEASURE", "0")
    assert dispatch.select(_table(), "auto", cuda, torch.bfloat16, key="k3",
                           measure=measure)[0] == "cuda"
    assert len(built) == 2


def test_select_alias_and_lazy_loading(monkeypatch):
    """"cuda" may name another entry (an op without a CUDA C++ kernel runs Triton); only the
    chosen entry is loaded."""
    monkeypatch.setattr(dispatch, "cuda_extension", lambda: None)  # not built: alias still runs
    monkeypatch.setattr(dispatch, "_has_triton", lambda: True)
    calls = []
    table = dict(_table(calls), cuda="triton")
    cuda = torch.device("cuda")
    assert dispatch.select(table, "cuda", cuda, torch.float16)[0] == "triton"
    assert dispatch.select(table, "auto", cuda, torch.float16)[0] == "triton"
    assert calls == ["triton", "triton"]
    with pytest.raises(ValueError, match="CUDA"):
        dispatch.select(table, "cuda", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="not built"):
        dispatch.select(_table(), "cuda", cuda, torch.float16)


def test_select_rules():
    cpu = torch.device("cpu")
    assert dispatch.select(_table(), "auto", cpu, torch.float32)[0] == "torch"
    assert dispatch.select(_table(), "auto", cpu, torch.float64)[0] == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        dispatch.select(_table(), "cuda", cpu, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        dispatch.select(_table(), "fast", cpu, torch.float32)
    if dispatch.backends()["triton"] and not torch.cuda.is_available():
        with pytest.raises(TypeError, match="float64"):
            dispatch.select(_table(), "triton", cpu, torch.float64)


def test_erm_backend_env(monkeypatch):
    monkeypatch.setenv("ERM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ERM_BACKEND"):
        dispatch.select(_table(), "auto", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("ERM_BACKEND", "torch")
    assert dispatch.select(_table(), "auto", torch.device("cpu"), torch.float32)[0] == "torch"


@pytest.mark.skipif(not (torch.cuda.is_available() and dispatch.cuda_extension() is not None
                         and dispatch._has_triton()), reason="needs a GPU with erm._C and triton")
def test_auto_measures_on_gpu():
    import erm

    z = torch.randn(64, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 32000, (64,), device="cuda")
    st = erm.token_stats(z, t, entropy=True)
    st.logprob.sum().backward()
    (choice,) = dispatch._FASTEST.values()
    assert choice in ("cuda", "triton")
    ref = erm.token_stats(z.detach(), t, entropy=True, backend=choice)
    assert torch.equal(st.lse, ref.lse)


def test_old_triton_interpreter_with_new_numpy_is_refused_clearly(monkeypatch):
    """Triton < 3.7's interpreter cannot turn program ids into loop bounds under NumPy >= 2.4:
    the triton backend on CPU says so before any kernel runs."""
    import numpy

    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch._check_interpreter.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match="numpy<2.4 or triton>=3.7"):
        dispatch.select(_table(), "triton", torch.device("cpu"), torch.float32)
    dispatch._check_interpreter.cache_clear()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert dispatch.select(_table(), "triton", torch.device("cpu"), torch.float32)[0] == "triton"
    dispatch._check_interpreter.cache_clear()
