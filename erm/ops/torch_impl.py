"""The `torch` backend of the per-token ops: chunked PyTorch, any device.

Math (x = z/α, p = softmax(x)): lse = logsumexp(x), target_logit = z[a], logprob = x[a] − lse,
entropy H = lse − Σ p·x. Backward for upstream grads (g_lp, g_lse, g_tl, g_H):

    dz_j = p_j/α · (g_lse − g_lp − g_H·(x_j − lse + H)) + [j == a]·(g_lp/α + g_tl)

Rows are processed in chunks so the float32 working set stays below `CHUNK_BYTES` whatever N is:
no N×V float32 tensor is ever created. The Triton kernels in `erm.kernels.token_stats` compute the
same thing in one pass; this file is their readable twin and the CPU path.
"""
import torch

_empty = torch.empty  # tests swap in a NaN-filling allocator to catch unwritten outputs
CHUNK_BYTES = 32 * 2**20  # float32 working set per chunk (a few temporaries of this size)


def _rows_per_chunk(v: int) -> int:
    return max(1, CHUNK_BYTES // (4 * v))


def _finite_times(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p·x with 0·(−inf) taken as 0 (a −inf logit has probability 0 and contributes nothing)."""
    return torch.where(p > 0, p * x, torch.zeros((), dtype=p.dtype, device=p.device))


def forward(logits2d, targets, alpha: float, ignore_index: int, with_entropy: bool):
    """logits2d (N, V) any float dtype, last stride 1; targets (N,) int64 (validated).

    Returns float32 (logprob, lse, target_logit, entropy) each (N,); entropy is (0,) if not asked."""
    n, v = logits2d.shape
    dev = logits2d.device
    acc = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
    logprob = _empty(n, dtype=acc, device=dev)
    lse = _empty(n, dtype=acc, device=dev)
    tl_out = _empty(n, dtype=acc, device=dev)
    ent = _empty(n if with_entropy else 0, dtype=acc, device=dev)
    step = _rows_per_chunk(v)
    inv_alpha = 1.0 / alpha
    for s in range(0, n, step):
        e = min(n, s + step)
        z = logits2d[s:e].to(torch.float64 if logits2d.dtype == torch.float64 else torch.float32)
        t = targets[s:e]
        valid = t != ignore_index
        tz = z.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
        tz = torch.where(valid, tz, 0.0)
        x = z * inv_alpha if alpha != 1.0 else z  # never in place: .float() may alias the input
        m = x.amax(dim=1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        ex = torch.exp(x - m)
        ssum = ex.sum(dim=1)
        row_lse = torch.log(ssum) + m.squeeze(1)
        lse[s:e] = row_lse
        tl_out[s:e] = tz
        logprob[s:e] = torch.where(valid, tz * inv_alpha - row_lse, 0.0)
        if with_entropy:
            # H = log s − Σ e·(x − m)/s, centred on the max to avoid cancellation
            w = _finite_times(ex, x - m).sum(dim=1)
            ent[s:e] = torch.log(ssum) - w / ssum
        del z, x, ex
    return logprob, lse, tl_out, ent


def backward(logits2d, targets, lse, ent, g_lp, g_lse, g_tl, g_ent, alpha: float, ignore_index: int):
    """Gradient w.r.t. logits2d (N, V), in logits2d's dtype. Upstream grads are float32 (N,) or None."""
    n, v = logits2d.shape
    grad = _empty((n, v), dtype=logits2d.dtype, device=logits2d.device)
    step = _rows_per_chunk(v)
    inv_alpha = 1.0 / alpha
    for s in range(0, n, step):
        e = min(n, s + step)
        x = logits2d[s:e].to(torch.float64 if logits2d.dtype == torch.float64 else torch.float32)
        if alpha != 1.0:
            x = x * inv_alpha  # never in place: .float() may alias the input
        t = targets[s:e]
        valid = t != ignore_index
        row_lse = lse[s:e].unsqueeze(1)
        p = torch.exp(x - row_lse)
        coef = torch.zeros(e - s, dtype=x.dtype, device=x.device)
        if g_lse is not None:
            coef = coef + g_lse[s:e]
        if g_lp is not None:
            coef = coef - torch.where(valid, g_lp[s:e], 0.0)
        gz = p * coef.unsqueeze(1)
        if g_ent is not None:
            gz = gz - g_ent[s:e].unsqueeze(1) * _finite_times(p, x - row_lse + ent[s:e].unsqueeze(1))
        gz.mul_(inv_alpha)
        tgt = torch.zeros(e - s, dtype=x.dtype, device=x.device)
        if g_lp is not None:
            tgt = tgt + g_lp[s:e] * inv_alpha
        if g_tl is not None:
            tgt = tgt + g_tl[s:e]
        tgt = torch.where(valid, tgt, 0.0)
        idx = torch.where(valid, t, 0).unsqueeze(1)
        # the target-class term is added in float32 before the single cast to the input dtype
        gz.scatter_add_(1, idx, tgt.unsqueeze(1))
        grad[s:e] = gz.to(grad.dtype)
        del x, p, gz
    return grad
