"""erm.linear_token_stats / erm.linear_endogenous_rewards against a float64 reference built from
hidden.double() @ weight.double().T (+ bias): outputs and gradients w.r.t. hidden, weight and bias
for random upstream weights, on the torch backend and on the Triton kernels (through the
interpreter on CPU). Shapes are tiny and deliberately not multiples of the kernel blocks.

Tolerances (relative error in norm, `rel_err`): float32 2e-5 on both backends — the kernels
accumulate in float32 (tl.dot with input_precision="ieee"), observed errors are ~5e-7; bf16/fp16
3e-2 (inputs are rounded to 8 bits of mantissa and dz is rounded to bf16 before the weight-grad
GEMMs, as in every fused LM-head kernel).
"""
import pytest
import torch

import erm
from erm import dispatch

from .reference import rel_err, token_stats_ref

BACKENDS = ["torch"] + (["triton"] if dispatch.backends()["triton"] else [])
# Inputs are drawn on the CPU (reproducible) and moved to where the kernels run: the GPU when there
# is one, else the CPU (Triton through the interpreter). The float64 reference runs there too.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
IGN = -100
F32_TOL = 2e-5


def _kernels():
    from erm.kernels import linear_token_stats as k
    return k


def _inputs(n, d, v, *, bias=True, dtype=torch.float32, scale=1.0, seed=0, ignore=True,
            device=DEV):
    h, w, b, t, ups = _cpu_inputs(n, d, v, bias=bias, dtype=dtype, scale=scale, seed=seed,
                                  ignore=ignore)
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return to(h), to(w), to(b), to(t), [to(u) for u in ups]


def _cpu_inputs(n, d, v, *, bias, dtype, scale, seed, ignore):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore and n > 2:
        t[1] = IGN
        t[-1] = IGN
    ups = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4)]
    return h, w, b, t, ups


def _ref(h, w, b, t, alpha):
    """Outputs and grads (hidden, weight, bias) of the float64 reference for upstream `ups`."""
    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    z = hd @ wd.t() + (0 if bd is None else bd)
    return (hd, wd, bd), token_stats_ref(z, t, alpha, IGN)


def _run(h, w, b, t, ups, alpha, backend, **kw):
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    st = erm.linear_token_stats(hh, ww, t, bias=bb, temperature=alpha, ignore_index=IGN,
                                entropy=True, backend=backend, **kw)
    sum((o * u.to(o.dtype)).sum() for o, u in zip(st, ups)).backward()
    return st, (hh.grad, ww.grad, None if bb is None else bb.grad)


def _check(h, w, b, t, ups, alpha, backend, tol, **kw):
    st, grads = _run(h, w, b, t, ups, alpha, backend, **kw)
    leaves, ref = _ref(h, w, b, t, alpha)
    sum((o * u).sum() for o, u in zip(ref, ups)).backward()
    for name, got, want in zip(("logprob", "lse", "target_logit", "entropy"), st, ref):
        assert got.dtype == torch.float32 and got.shape == t.shape, name
        assert rel_err(got, want) < tol, (name, rel_err(got, want))
    for name, got, leaf in zip(("hidden", "weight", "bias"), grads, leaves):
        if leaf is None:
            assert got is None
            continue
        assert got.dtype == h.dtype and got.shape == leaf.shape, name
        assert rel_err(got, leaf.grad) < tol, (name, rel_err(got, leaf.grad))
    return st, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,v,bias,alpha", [
    (1, 16, 50, False, 1.0),
    (5, 24, 97, True, 0.7),
    (37, 16, 97, True, 1.0),
    (37, 24, 50, False, 0.7),
])
def test_matches_reference_f32(backend, n, d, v, bias, alpha):
    h, w, b, t, ups = _inputs(n, d, v, bias=bias, scale=2.0)
    _check(h, w, b, t, ups, alpha, backend, F32_TOL)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("deterministic", [True, False])
def test_triton_split_paths(monkeypatch, deterministic):
    """Forward split over several vocab chunks (partials merged by the combine) and the
    deterministic backward over several dz chunks (multi-chunk float32 grad_hidden)."""
    k = _kernels()
    monkeypatch.setattr(k, "TARGET_PROGRAMS", 64)       # 3 token blocks -> vocab split in 4
    monkeypatch.setattr(k, "DZ_BUDGET_BYTES", 37 * 4 * 32)  # 32-column dz chunks
    v = 97 if k.INTERPRET else 1000  # chunks are multiples of 32 (interpreter) / 256 (GPU)
    h, w, b, t, ups = _inputs(37, 24, v, scale=2.0)
    assert k._fwd_chunks(37, v, h.device)[1] > 1
    _check(h, w, b, t, ups, 0.7, "triton", F32_TOL, deterministic=deterministic)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    h, w, b, t, ups = _inputs(37, 24, 97, dtype=dtype, scale=2.0)
    _check(h, w, b, t, ups, 1.0, backend, 3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """Logits reaching ±1e3 (temperature 0.7): lse/entropy stay finite and accurate. Tolerance
    2e-4: a float32 logit of size 1e3 carries ~1e-4 absolute rounding (|z|·2^-24·√D), which the
    entropy and gradients of near-one-hot rows see directly (the torch backend, also float32,
    errs by the same amount)."""
    h, w, b, t, ups = _inputs(5, 16, 50, bias=True, scale=1.0)
    h = h * (1e3 / (h @ w.t()).abs().max())
    st, _ = _check(h, w, b, t, ups, 0.7, backend, 2e-4)
    assert (h @ w.t()).abs().max() > 900
    assert all(torch.isfinite(x).all() for x in st)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocab_bias(backend):
    """A bias of −inf on some tokens (vocabulary masking): they get p = 0, no NaN anywhere."""
    h, w, b, t, ups = _inputs(6, 16, 50, scale=2.0, ignore=False)
    b[::3] = float("-inf")
    t = torch.where(t % 3 == 0, t + 1, t)
    st, grads = _run(h, w, b, t, ups, 0.7, backend)
    leaves, ref = _ref(h, w, b, t, 0.7)
    sum((o * u).sum() for o, u in zip(ref, ups)).backward()
    for got, want in zip(st, ref):
        assert rel_err(got, want) < F32_TOL
    assert rel_err(grads[0], leaves[0].grad) < F32_TOL
    assert rel_err(grads[1], leaves[1].grad) < F32_TOL
    assert torch.isfinite(grads[2]).all() and (grads[2][::3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_rows_get_no_logprob_gradient(backend):
    h, w, b, t, _ = _inputs(6, 16, 50)
    hh = h.clone().requires_grad_()
    st = erm.linear_token_stats(hh, w, t, bias=b, backend=backend)
    ign = t == IGN
    assert (st.logprob[ign] == 0).all() and (st.target_logit[ign] == 0).all()
    assert (st.lse[ign] != 0).all()
    st.logprob.sum().backward()
    assert (hh.grad[ign] == 0).all() and (hh.grad[~ign] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding(backend):
    """The LM-head weight is the input embedding: both uses' gradients accumulate."""
    g = torch.Generator().manual_seed(3)
    v, d, bsz, T = 50, 16, 2, 6
    emb0 = (torch.randn(v, d, generator=g) * 0.3).to(DEV)
    mix0 = (torch.randn(d, d, generator=g) / d ** 0.5).to(DEV)
    ids = torch.randint(0, v, (bsz, T), generator=g).to(DEV)
    u = torch.randn(bsz, T, generator=g).to(DEV)

    def loss(emb, mix, lm):
        hidden = torch.tanh(emb[ids] @ mix)                      # (B, T, D)
        lp, ent = lm(hidden, emb)
        return (lp * u).sum() + ent.sum()

    emb = torch.nn.Parameter(emb0.clone())
    mix = torch.nn.Parameter(mix0.clone())
    loss(emb, mix, lambda hs, wt: tuple(
        x for x in erm.linear_token_stats(hs, wt, ids, entropy=True, backend=backend)
        if x is not None)[::3]).backward()
    emb_d = emb0.double().requires_grad_()
    mix_d = mix0.double().requires_grad_()

    def ref_lm(hs, wt):
        lp, _, _, ent = token_stats_ref(hs @ wt.t(), ids, 1.0, IGN)
        return lp, ent
    loss(emb_d, mix_d, ref_lm).backward()
    assert rel_err(emb.grad, emb_d.grad) < F32_TOL
    assert rel_err(mix.grad, mix_d.grad) < F32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_views_and_frozen_weight(backend):
    """(B, T, D) hidden sliced as hidden[:, :-1] (non-contiguous), weight without grad."""
    g = torch.Generator().manual_seed(5)
    hid = torch.randn(2, 7, 16, generator=g).to(DEV)
    w = (torch.randn(50, 16, generator=g) / 4).to(DEV)
    t = torch.randint(0, 50, (2, 6), generator=g).to(DEV)
    hh = hid.clone().requires_grad_()
    st = erm.linear_token_stats(hh[:, :-1], w, t, backend=backend)
    assert st.logprob.shape == (2, 6) and st.entropy is None
    st.logprob.sum().backward()
    hd = hid.double().requires_grad_()
    lp = token_stats_ref(hd[:, :-1] @ w.double().t(), t)[0]
    lp.sum().backward()
    assert rel_err(st.logprob, lp) < F32_TOL and rel_err(hh.grad, hd.grad) < F32_TOL
    assert (hh.grad[:, -1] == 0).all()


def test_torch_and_triton_agree_and_deterministic():
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    h, w, b, t, ups = _inputs(20, 16, 97)
    a = _run(h, w, b, t, ups, 1.0, "triton")
    a2 = _run(h, w, b, t, ups, 1.0, "triton")
    c = _run(h, w, b, t, ups, 1.0, "torch")
    for x, x2 in zip(a[1], a2[1]):
        assert torch.equal(x, x2)                   # deterministic=True is bitwise reproducible
    for x, y in zip(list(a[0]) + list(a[1]), list(c[0]) + list(c[1])):
        assert rel_err(x, y) < F32_TOL


def test_gradcheck_float64_torch():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, IGN, 6, 3])

    def f(h, w, b):
        st = erm.linear_token_stats(h, w, t, bias=b, temperature=0.7, entropy=True, backend="torch")
        assert st.lse.dtype == torch.float64
        return tuple(st)

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_auto_backend_cpu_is_torch():
    from erm.ops.linear_token_stats import BACKENDS as table
    assert dispatch.select(table, "auto", torch.device("cpu"), torch.float32)[0] == "torch"
    h, w, b, t, _ = _inputs(3, 16, 50, device="cpu")
    a = erm.linear_token_stats(h, w, t, bias=b)
    c = erm.linear_token_stats(h, w, t, bias=b, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a[:3], c[:3]))


def test_bad_inputs():
    h, w, b, t, _ = _inputs(4, 16, 50, device="cpu")
    f = erm.linear_token_stats
    with pytest.raises(ValueError, match="D="):
        f(h, w[:, :8], t)
    with pytest.raises(ValueError, match="bias"):
        f(h, w, t, bias=b[:10])
    with pytest.raises(TypeError, match="same dtype"):
        f(h, w.double(), t)
    with pytest.raises(TypeError, match="bias"):
        f(h, w, t, bias=b.half())
    with pytest.raises(TypeError):
        f(h.long(), w.long(), t)
    with pytest.raises(TypeError):
        f(h, w, t.float())
    with pytest.raises(ValueError, match="outside"):
        f(h, w, torch.tensor([0, 1, 50, 2]))
    with pytest.raises(ValueError, match="outside"):
        f(h, w, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="temperature"):
        f(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        f(h, w, t, temperature=-1.0)
    with pytest.raises(ValueError, match="empty"):
        f(h[:0], w, t[:0])
    with pytest.raises(ValueError, match="empty"):
        f(h, w[:0], t)
    with pytest.raises(ValueError, match="leading shape"):
        f(h, w, t[:3])
    with pytest.raises(ValueError, match=r"\(V, D\)"):
        f(h, w[0], t)
    with pytest.raises(ValueError, match="backend"):
        f(h, w, t, backend="nope")
    with pytest.raises(ValueError, match="CUDA"):
        f(h, w, t, backend="cuda")
    if "triton" in BACKENDS:
        with pytest.raises(TypeError, match="float64"):
            f(h.double().to(DEV), w.double().to(DEV), t.to(DEV), backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    h, w, b, t, ups = _inputs(5, 16, 50)

    def fn(h, w, b):
        st = erm.linear_token_stats(h, w, t, bias=b, entropy=True, temperature=0.7, backend=backend)
        return (st.logprob * ups[0].float()).sum() + st.entropy.sum() + st.lse.sum()

    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = [x.clone().requires_grad_() for x in (h, w, b)]
    args_e = [x.clone().requires_grad_() for x in (h, w, b)]
    out, out_e = cfn(*args), fn(*args_e)
    out.backward()
    out_e.backward()
    assert torch.allclose(out, out_e, rtol=1e-6, atol=1e-5)
    for a, e in zip(args, args_e):
        assert torch.allclose(a.grad, e.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_endogenous_rewards(backend):
    g = torch.Generator().manual_seed(2)
    hid = torch.randn(3, 8, 16, generator=g).to(DEV)
    w = (torch.randn(50, 16, generator=g) / 2).to(DEV)
    b = torch.randn(50, generator=g).to(DEV)
    ids = torch.randint(0, 50, (3, 8), generator=g).to(DEV)
    mask = torch.zeros(3, 8, dtype=torch.bool, device=DEV)
    mask[0, 3:] = True
    mask[1, 2:5] = True
    mask[2, 6:] = True
    term = torch.tensor([True, False, True], device=DEV)
    kw = dict(response_mask=mask, alpha=0.7, gamma=0.9, terminated=term)
    hh = hid.clone().requires_grad_()
    r = erm.linear_endogenous_rewards(hh, w, ids, bias=b, backend=backend, **kw)
    hz = hid.clone().requires_grad_()
    r_ref = erm.endogenous_rewards(hz @ w.t() + b, ids, backend="torch", **kw)
    assert r.shape == (3, 8) and r.dtype == torch.float32
    assert torch.allclose(r, r_ref, rtol=1e-5, atol=1e-5)
    r.sum().backward()
    r_ref.sum().backward()
    assert rel_err(hh.grad, hz.grad) < F32_TOL
    with pytest.raises(ValueError, match="B, T, D"):
        erm.linear_endogenous_rewards(hid[0], w, ids[0])
    with pytest.raises(ValueError, match="position 0"):
        bad = mask.clone()
        bad[0, 0] = True
        erm.linear_endogenous_rewards(hid, w, ids, response_mask=bad)


def test_bench_smoke(capsys):
    """The bench stays runnable: a tiny CPU run (numbers not checked)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benches" / "bench_linear_token_stats.py"
    spec = importlib.util.spec_from_file_location("bench_linear_token_stats", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--device", "cpu", "--n", "8", "--d", "16", "--v", "64", "--dtype", "float32",
                     "--reps", "2", "--warmup", "1", "--no-compile"])
    assert {"erm (torch)", "torch eager"} <= {r["name"] for r in rows}
    assert "| op |" in capsys.readouterr().out


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_common_offset(backend):
    """A bias adding 1e4 to every logit. The float32 logits themselves then carry ~1e-3 of
    rounding (the ulp of 1e4), which the kernels' own tile sums see; given those logits the
    statistics are centred on the row max, so the torch backend matches the float64 reference of
    its float32 logits to ~1e-6 (z/α − lse would lose another ~5e-4), and every backend keeps
    log-probs ≤ 0 and finite gradients."""
    h, w, b, t, ups = _inputs(21, 16, 97, scale=2.0)
    b = b + 1e4
    st, grads = _run(h, w, b, t, ups, 0.7, backend)
    assert (st.logprob <= 0).all() and all(torch.isfinite(g).all() for g in grads)
    if backend == "torch":
        ref = token_stats_ref(torch.addmm(b, h, w.t()), t, 0.7, IGN)
        assert (st.logprob.double() - ref[0]).abs().max() < 2e-6
        assert (st.entropy.double() - ref[3]).abs().max() < 2e-6


def test_linear_rewards_validate_once(monkeypatch):
    """linear_endogenous_rewards validates its inputs once and range-checks the ids once."""
    import sys

    from erm import _checks
    mod = sys.modules["erm.ops.linear_token_stats"]
    g = torch.Generator().manual_seed(4)
    hid, w = torch.randn(2, 5, 16, generator=g), torch.randn(50, 16, generator=g)
    ids = torch.randint(0, 50, (2, 5), generator=g)
    calls = {"inputs": 0, "range": 0}
    real_in, real_range = mod._check_linear_inputs, _checks.check_target_range
    monkeypatch.setattr(mod, "_check_linear_inputs", lambda *a: calls.__setitem__(
        "inputs", calls["inputs"] + 1) or real_in(*a))
    monkeypatch.setattr(_checks, "check_target_range", lambda *a: calls.__setitem__(
        "range", calls["range"] + 1) or real_range(*a))
    erm.linear_endogenous_rewards(hid, w, ids, terminated=[True, False])
    assert calls == {"inputs": 1, "range": 1}
