"""Property-based tests (hypothesis, derandomized: the same cases every run): invariants of the
token statistics and rewards over dtypes, tiny shapes, temperatures down to MIN_TEMPERATURE,
common offsets up to ±1e4, −inf entries and ignored rows, against the float64 references of
tests/reference.py; torch and Triton (the interpreter on CPU) agree, gradients included.

About 1100 generated cases in all; shapes stay tiny so the Triton interpreter stays fast.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import erm
from erm import dispatch
from erm.constants import IGNORE_INDEX, MIN_TEMPERATURE

from .reference import endogenous_ref, rel_err, response_logprob_ref, soft_value_ref, \
    token_stats_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = dispatch.backends()["triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _settings(n):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


temperatures = st.one_of(st.sampled_from([1.0, MIN_TEMPERATURE, 2 * MIN_TEMPERATURE, 1e-3, 0.01]),
                         st.floats(0.05, 5.0))
offsets = st.one_of(st.sampled_from([0.0, 1e4, -1e4, 3e3]), st.floats(-1e4, 1e4))


@st.composite
def cases(draw, max_rows=4, max_v=40):
    """(logits, targets, alpha): logits rounded to their dtype (the reference sees the same
    values); −inf entries never fill a row; targets on finite entries or IGNORE_INDEX."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, max_rows))
    v = draw(st.integers(1, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    offset = draw(offsets)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * scale + offset
    if draw(st.booleans()):  # −inf entries (a masked vocabulary), one finite entry kept per row
        z[torch.rand(n, v, generator=g) < 0.3] = float("-inf")
        keep = torch.randint(0, v, (n,), generator=g)
        z[torch.arange(n), keep] = offset
    z = z.to(dtype)
    finite = torch.isfinite(z.float())
    t = torch.multinomial(finite.float(), 1, generator=g).squeeze(1)
    t[torch.rand(n, generator=g) < 0.25] = IGNORE_INDEX
    return z, t, draw(temperatures)


def _close(got, want, rtol, atol):
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = torch.isnan(want) | (got == want) | ((got - want).abs() <= atol + rtol * want.abs())
    assert ok.all(), (got, want)


def _stats(z, t, alpha, backend, grad_weights=None):
    zz = z.to(DEV).clone().requires_grad_(grad_weights is not None)
    out = erm.token_stats(zz, t.to(DEV), temperature=alpha, entropy=True, backend=backend)
    if grad_weights is None:
        return [o.cpu() for o in out], None
    loss = sum((o * w.to(DEV)).sum() for o, w in zip(out, grad_weights))
    (g,) = torch.autograd.grad(loss, zz)
    return [o.detach().cpu() for o in out], g.cpu()


@_settings(450)
@given(cases())
def test_invariants_against_reference(case):
    """logprob ≤ 0, lse ≥ rowmax/α, 0 ≤ H ≤ log V, and the float64 reference values."""
    z, t, alpha = case
    lp, lse, tl, ent = _stats(z, t, alpha, "torch")[0]
    ref = token_stats_ref(z, t, alpha)
    v = z.shape[-1]
    rowmax = z.double().amax(-1)
    assert (lp <= 0).all()
    assert (lse.double() >= rowmax / alpha - 1e-6 * (rowmax / alpha).abs() - 1e-6).all()
    assert (ent >= -1e-5).all() and (ent <= math.log(v) + 1e-5).all()
    _close(lp, ref[0], 1e-5, 1e-5)
    _close(lse, ref[1], 1e-6, 1e-5)
    _close(tl, ref[2], 0, 0)
    _close(ent, ref[3], 1e-4, 2e-5)


@_settings(200)
@given(cases(), st.integers(0, 2**31 - 1))
def test_gradients_match_reference(case, seed):
    z, t, alpha = case
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(t.shape, generator=g) for _ in range(4)]
    _, grad = _stats(z, t, alpha, "torch", w)
    zr = z.double().requires_grad_(True)
    ref = token_stats_ref(zr, t, alpha)
    (gr,) = torch.autograd.grad(sum((o * wi.double()).sum() for o, wi in zip(ref, w)), zr)
    assert grad.dtype == z.dtype
    tol = 2e-5 if z.dtype == torch.float32 else 1e-2
    assert rel_err(grad, gr) < tol or (grad.double() - gr).abs().max() < 1e-6


@pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
@_settings(250)
@given(cases(max_rows=3, max_v=24), st.integers(0, 2**31 - 1))
def test_torch_and_triton_agree(case, seed):
    z, t, alpha = case
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(t.shape, generator=g) for _ in range(4)]
    a, ga = _stats(z, t, alpha, "torch", w)
    b, gb = _stats(z, t, alpha, "triton", w)
    for x, y, rtol in zip(a, b, (1e-5, 1e-6, 0.0, 1e-4)):
        _close(y, x, rtol, 2e-5)
    tol = 3e-5 if z.dtype == torch.float32 else 1e-2
    assert rel_err(gb, ga) < tol or (gb.double() - ga.double()).abs().max() < 1e-6


@_settings(200)
@given(st.integers(1, 3), st.integers(3, 8), st.integers(2, 30), st.integers(0, 2**31 - 1),
       temperatures, offsets, st.booleans())
def test_rewards_telescope(b, t, v, seed, alpha, offset, truncated):
    """Σ_t r_t = α·log π(y|x) + V(s_1) for a terminated response (γ = 1); truncated, the soft
    value after the last token is added back; and every r_t matches the explicit loops."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3 + offset
    ids = torch.randint(0, v, (b, t), generator=g)
    start = int(torch.randint(1, t, (1,), generator=g))
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, start:] = True
    r = erm.endogenous_rewards(logits.to(DEV), ids.to(DEV), response_mask=mask.tolist(),
                               alpha=alpha, terminated=not truncated).cpu().double()
    expect = alpha * response_logprob_ref(logits, ids, start, alpha) + \
        soft_value_ref(logits[:, start - 1], alpha)
    if truncated:
        expect = expect - soft_value_ref(logits[:, -1], alpha)
    atol = 1e-6 * t * (abs(offset) + 30) + 1e-4
    assert torch.allclose(r.sum(1), expect, rtol=0, atol=atol)
    ref = endogenous_ref(logits, ids, mask, alpha, 1.0, not truncated)
    assert torch.allclose(r, ref, rtol=0, atol=atol)
