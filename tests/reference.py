"""Float64 references straight from the math in the developers' guide (no erm code)."""
import torch


def token_stats_ref(logits, targets, alpha=1.0, ignore_index=-100):
    """(logprob, lse, target_logit, entropy) in float64; differentiable w.r.t. logits."""
    z = logits.double()
    x = z / alpha
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    tz = torch.where(valid, z.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    lp = torch.where(valid, tz / alpha - lse, 0.0)
    p = torch.softmax(x, dim=-1)
    px = torch.where(p > 0, p * torch.where(p > 0, x, 0.0), 0.0)
    ent = lse - px.sum(-1)
    return lp, lse, tz, ent


def endogenous_ref(logits, ids, mask, alpha=1.0, gamma=1.0, terminated=True):
    """r_t = z_{t-1}[a_t] − γ·V(s_{t+1}) by explicit loops, float64."""
    z = logits.double()
    b, t, _ = z.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    term = terminated if isinstance(terminated, torch.Tensor) else torch.full((b,), bool(terminated))
    for i in range(b):
        pos = [j for j in range(t) if mask[i, j]]
        for j in pos:
            q = z[i, j - 1, ids[i, j]]
            v_next = alpha * torch.logsumexp(z[i, j] / alpha, -1)
            if j == pos[-1] and bool(term[i]):
                v_next = v_next * 0
            out[i, j] = q - gamma * v_next
    return out


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in float64 (NaN anywhere fails)."""
    a, b = a.double(), b.double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def soft_value_ref(logits, alpha=1.0):
    """α·logsumexp(z/α) per position, float64."""
    return alpha * torch.logsumexp(logits.double() / alpha, dim=-1)


def response_logprob_ref(logits, ids, start, alpha=1.0):
    """Σ_{t ≥ start} log softmax(z_{t−1}/α)[ids[t]] per row, float64 ((B, T, V) logits)."""
    logp = torch.log_softmax(logits.double() / alpha, dim=-1)
    t = ids.shape[1]
    return sum(logp[:, j - 1].gather(-1, ids[:, j:j + 1]).squeeze(-1) for j in range(start, t))
