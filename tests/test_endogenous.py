"""erm.endogenous_rewards and erm.soft_values against the formulas, computed by explicit loops."""
import pytest
import torch

import erm
from erm import dispatch

from .reference import endogenous_ref

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
    logp = torch.log_softmax(logits.double() / alpha, -1)
    lp_y = sum(logp[:, j - 1].gather(-1, ids[:, j:j + 1]).squeeze(-1) for j in range(start, 10))
    v1 = alpha * torch.logsumexp(logits.double()[:, start - 1] / alpha, -1)
    assert torch.allclose(r.sum(1).double(), alpha * lp_y + v1, atol=1e-4)


def test_soft_values_and_gradient():
    logits, ids = _inputs(b=2, t=4, v=17)
    z = logits.clone().requires_grad_(True)
    v = erm.soft_values(z, alpha=0.5)
    assert torch.allclose(v.double(), 0.5 * torch.logsumexp(logits.double() / 0.5, -1), atol=1e-5)
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
