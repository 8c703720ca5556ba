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


def test_choose_measures_only_for_auto_with_both_backends(monkeypatch):
    monkeypatch.setattr(dispatch, "resolve", lambda b, d, t=None: "cuda" if b == "auto" else b)
    monkeypatch.setattr(dispatch, "_has_triton", lambda: True)
    built = []

    def runners(names):
        built.append(names)
        return {"cuda": lambda: time.sleep(0.003), "triton": lambda: None}

    assert dispatch.choose("auto", "cuda", torch.bfloat16, "key", runners) == "triton"
    assert built == [("cuda", "triton")]
    assert dispatch.choose("auto", "cuda", torch.bfloat16, "key") == "triton"  # backward: reuse
    assert dispatch.choose("cuda", "cuda", torch.bfloat16, "key", runners) == "cuda"  # explicit
    monkeypatch.setenv("ERM_MEASURE", "0")
    assert dispatch.choose("auto", "cuda", torch.bfloat16, "other", runners) == "cuda"
    assert len(built) == 1


def test_resolve_rules():
    assert dispatch.resolve("auto", torch.device("cpu")) == "torch"
    assert dispatch.resolve("auto", torch.device("cpu"), torch.float64) == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        dispatch.resolve("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        dispatch.resolve("fast", torch.device("cpu"))


def test_erm_backend_env(monkeypatch):
    monkeypatch.setenv("ERM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ERM_BACKEND"):
        dispatch.resolve("auto", torch.device("cpu"))
    monkeypatch.setenv("ERM_BACKEND", "torch")
    assert dispatch.resolve("auto", torch.device("cpu")) == "torch"


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
        dispatch.resolve("triton", torch.device("cpu"), torch.float32)
    dispatch._check_interpreter.cache_clear()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert dispatch.resolve("triton", torch.device("cpu"), torch.float32) == "triton"
    dispatch._check_interpreter.cache_clear()
