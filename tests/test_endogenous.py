"""erm.endogenous_rewards and erm.soft_values against the formulas, computed by explicit loops."""
import numpy as np
import pytest
import torch

import erm
from erm import dispatch

from .reference import endogenous_ref, response_logprob_ref, soft_value_ref

BACKENDS = ["torch"] + (["triton"] if dispatch.backends()["triton"] else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the backends run (the reference: CPU)


def _inputs(b=3, t=9, v=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    ids = torch.randint(0, v, (b, t), generator=g)
    return logits, ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha,gamma", [(1.0, 1.0), (0.5, 0.9), (2.0, 1.0)])
def test_matches_formula(backend, alpha, gamma):
    logits, ids = _inputs()
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 4:] = True          # response to the end
    mask[1, 2:6] = True         # right padding after the response
    mask[2, 7:9] = True         # short response, left-padded-style prompt
    term = torch.tensor([True, False, True])
    r = erm.endogenous_rewards(logits.to(DEV), ids.to(DEV), response_mask=mask.to(DEV),
                               alpha=alpha, gamma=gamma, terminated=term.to(DEV), backend=backend)
    assert r.device.type == DEV
    r = r.cpu()
    ref = endogenous_ref(logits, ids, mask, alpha, gamma, term)
    assert r.dtype == torch.float32 and r.shape == (3, 9)
    assert torch.allclose(r.double(), ref, atol=1e-4, rtol=1e-5)
    assert (r[~mask] == 0).all()


def test_default_mask_and_truncation():
    logits, ids = _inputs(b=2, t=6)
    r_term = erm.endogenous_rewards(logits, ids)
    r_trunc = erm.endogenous_rewards(logits, ids, terminated=False)
    full = torch.ones(2, 6, dtype=torch.bool)
    full[:, 0] = False
    assert torch.allclose(r_term.double(), endogenous_ref(logits, ids, full, terminated=True), atol=1e-4)
    assert torch.allclose(r_trunc.double(), endogenous_ref(logits, ids, full, terminated=False), atol=1e-4)
    assert (r_term[:, 0] == 0).all()
    # only the last reward differs: by the soft value at the final position
    v_last = erm.soft_values(logits)[:, -1]
    assert torch.allclose(r_term[:, -1] - r_trunc[:, -1], v_last, atol=1e-4)
    assert torch.allclose(r_term[:, :-1], r_trunc[:, :-1])


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_response_reward_telescopes(alpha):
    """Σ r_t = α·log π(y|x) + V(s_1) for a terminated response (γ = 1)."""
    logits, ids = _inputs(b=2, t=10, seed=3)
    start = 4
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, start:] = True
    r = erm.endogenous_rewards(logits, ids, response_mask=mask, alpha=alpha)
    lp_y = response_logprob_ref(logits, ids, start, alpha)
    v1 = soft_value_ref(logits[:, start - 1], alpha)
    assert torch.allclose(r.sum(1).double(), alpha * lp_y + v1, atol=1e-4)


def test_soft_values_and_gradient():
    logits, ids = _inputs(b=2, t=4, v=17)
    z = logits.clone().requires_grad_(True)
    v = erm.soft_values(z, alpha=0.5)
    assert torch.allclose(v.double(), soft_value_ref(logits, 0.5), atol=1e-5)
    (g,) = torch.autograd.grad(v.sum(), z)
    assert torch.allclose(g, torch.softmax(logits / 0.5, -1), atol=1e-6)  # dV/dz = softmax(z/α)
    r = erm.endogenous_rewards(z, ids)
    (g,) = torch.autograd.grad(r.sum(), z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_input():
    logits, ids = _inputs(b=2, t=5)
    with pytest.raises(ValueError, match="input_ids"):
        erm.endogenous_rewards(logits, torch.full((2, 5), 61))
    with pytest.raises(ValueError, match="position 0"):
        erm.endogenous_rewards(logits, ids, response_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="response_mask"):
        erm.endogenous_rewards(logits, ids, response_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="terminated"):
        erm.endogenous_rewards(logits, ids, terminated=torch.tensor([True]))
    with pytest.raises(ValueError, match="alpha"):
        erm.endogenous_rewards(logits, ids, alpha=0)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        erm.endogenous_rewards(logits[0], ids[0])
    with pytest.raises(ValueError, match="leading shape"):
        erm.endogenous_rewards(logits, ids[:, :3])


@pytest.mark.parametrize("as_", [list, tuple, np.array, torch.tensor])
def test_terminated_per_row_sequences(as_):
    """terminated as a per-row list / tuple / NumPy array / tensor means what it says (a list of
    False used to be truthy: every row terminated)."""
    logits, ids = _inputs(b=2, t=6)
    full = torch.ones(2, 6, dtype=torch.bool)
    full[:, 0] = False
    r = erm.endogenous_rewards(logits, ids, terminated=as_([False, True]))
    assert torch.allclose(r.double(), endogenous_ref(logits, ids, full, terminated=torch.tensor(
        [False, True])), atol=1e-4)
    r_none = erm.endogenous_rewards(logits, ids, terminated=as_([False, False]))
    assert torch.equal(r_none, erm.endogenous_rewards(logits, ids, terminated=False))


@pytest.mark.parametrize("as_", [lambda m: m.tolist(), lambda m: m.numpy(), lambda m: m.int()])
def test_response_mask_as_list_or_array(as_):
    logits, ids = _inputs(b=2, t=6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:] = True
    mask[1, 3:5] = True
    r = erm.endogenous_rewards(logits, ids, response_mask=as_(mask))
    assert torch.equal(r, erm.endogenous_rewards(logits, ids, response_mask=mask))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(terminated=[True]), ValueError, "terminated"),
    (dict(terminated=[True, False, True]), ValueError, "terminated"),
    (dict(terminated=[[True, False]]), ValueError, "terminated"),
    (dict(terminated=[0.5, 1.0]), TypeError, "terminated"),
    (dict(terminated=[2, 0]), ValueError, "terminated"),
    (dict(terminated="yes"), TypeError, "terminated"),
    (dict(terminated=None), TypeError, "terminated"),
    (dict(response_mask=[[False, True]] * 2), ValueError, "response_mask"),
    (dict(response_mask=[[False, True, True, True], [False, True]]), TypeError, "response_mask"),
    (dict(gamma=float("nan")), ValueError, "gamma"),
    (dict(gamma=float("inf")), ValueError, "gamma"),
    (dict(gamma=True), TypeError, "gamma"),
    (dict(gamma="0.9"), TypeError, "gamma"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(alpha=1e-30), ValueError, "MIN_TEMPERATURE"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_reward_arguments(kw, exc, match):
    logits, ids = _inputs(b=2, t=4)
    with pytest.raises(exc, match=match):
        erm.endogenous_rewards(logits, ids, **kw)


def test_ids_checked_once_and_named(monkeypatch):
    """Every id is range-checked (position 0 and the IGNORE_INDEX value too), once per call (one
    device sync), and the message names input_ids without an internal sentinel."""
    from erm import _checks
    logits, ids = _inputs(b=2, t=5)
    calls = []
    real = _checks.check_target_range
    monkeypatch.setattr(_checks, "check_target_range", lambda *a: calls.append(1) or real(*a))
    erm.endogenous_rewards(logits, ids)
    assert len(calls) == 1
    for bad in ((0, 0, 61), (1, 3, -100), (0, 2, -1)):
        b_ids = ids.clone()
        b_ids[bad[0], bad[1]] = bad[2]
        with pytest.raises(ValueError, match="input_ids") as info:
            erm.endogenous_rewards(logits, b_ids)
        assert "ignore_index" not in str(info.value) and "2**62" not in str(info.value)
        assert str(2**62) not in str(info.value)


def test_rewards_from_stats_matches_endogenous_rewards():
    from erm.ops.endogenous import next_token_targets
    logits, ids = _inputs(b=3, t=7)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 1:4] = True
    mask[2, 5:] = True
    term = [True, False, True]
    nxt = next_token_targets(ids)
    assert torch.equal(nxt[:, :-1], ids[:, 1:]) and (nxt[:, -1] == -100).all()
    st = erm.token_stats(logits, nxt, temperature=0.7)
    r = erm.rewards_from_stats(st, mask, term, alpha=0.7, gamma=0.9)
    ref = erm.endogenous_rewards(logits, ids, response_mask=mask, terminated=term, alpha=0.7,
                                 gamma=0.9)
    assert torch.allclose(r, ref, atol=1e-6)
    with pytest.raises(ValueError, match="position 0"):
        erm.rewards_from_stats(st, torch.ones(3, 7, dtype=torch.bool), True, alpha=0.7)
    with pytest.raises(TypeError, match="stats"):
        erm.rewards_from_stats(st.lse, mask, True, alpha=0.7)
