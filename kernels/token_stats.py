"""Triton kernels for `erm.token_stats` (math: erm/ops/token_stats.py; test: tests/test_token_stats.py;
bench: benches/bench_token_stats.py).

Forward: one program per (row, vocabulary split). It reads each logit once, in BLOCK_V chunks, and
keeps in float32: m = running max of the raw logits (a scalar: one block reduction per chunk), and
per lane, in base 2 with d = (z − m)·log2(e)/α ≤ 0, s = Σ 2^d and w = Σ 2^d·d (the entropy
numerator), rescaled when m grows and reduced once per row. Centring on the raw max first means no
finite logit overflows (|z| up to 3.4e38), the log-prob (z[a] − m)/α − ln s keeps the digits of
z below its ulp at large offsets, and H = ln s − w/s does not cancel. When rows are too few to
fill the GPU the vocabulary is split across programs and a small combine kernel merges the
(m, s, w) partials. The target logit is a single scalar load. No softmax and no float32 copy of
the logits is ever written. Besides the four statistics the forward writes each row's state
(m, ln s), two floats, which is all the backward needs besides the logits.

Backward: one program per (row, BLOCK_V chunk): log p = (z − m)/α − ln s recomputed from the
logits and the saved state, the gradient written once, in the logits' dtype, with the
target-class term added in float32 before the cast.

Rows are addressed as (r // inner_rows)·stride_outer + (r % inner_rows)·stride_inner, so 2-D
tensors with any row stride and (B, T, V) views such as `logits[:, :-1]` run without a copy.
"""
import math

import torch
import triton
import triton.language as tl

from .rows import row_layout
from .autotune import autotune
from .common import centred, exp_terms, ref_max, rescale, sm_count

_empty = torch.empty  # tests swap in a NaN-filling allocator to catch unwritten outputs
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _row_base(row, inner_rows, s_outer, s_inner):
    row = row.to(tl.int64)
    return (row // inner_rows) * s_outer + (row % inner_rows) * s_inner


@triton.jit
def _finish(z_ptr, t_ptr, lp_ptr, lse_ptr, tl_ptr, ent_ptr, st_ptr, row, base, m, s, w, inv_alpha,
            ignore_index, WITH_ENT: tl.constexpr):
    """Write logprob, lse, target_logit, the row state (m, ln s) (and entropy) of one row from its
    merged (m, s, w): m the raw row max (0 for an all −inf row), s = Σ 2^d, w = Σ 2^d·d with
    d = (z − m)·log2(e)/α."""
    m = tl.where(m == float("-inf"), 0.0, m)
    log2_s = tl.log2(s)
    ln_s = log2_s * 0.6931471805599453
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    tz = tl.load(z_ptr + base + tl.where(valid, t, 0)).to(tl.float32)
    tz = tl.where(valid, tz, 0.0)
    lp = centred(tz, m) * inv_alpha - ln_s
    lp = tl.where(lp > 0.0, 0.0, lp)  # ≤ 0 whatever the rounding (NaN stays NaN)
    tl.store(lse_ptr + row, m * inv_alpha + ln_s)
    tl.store(tl_ptr + row, tz)
    tl.store(lp_ptr + row, tl.where(valid, lp, 0.0))
    tl.store(st_ptr + row.to(tl.int64) * 2, m)
    tl.store(st_ptr + row.to(tl.int64) * 2 + 1, ln_s)
    if WITH_ENT:
        tl.store(ent_ptr + row, (log2_s - w / s) * 0.6931471805599453)


@triton.jit
def _fwd_kernel(z_ptr, t_ptr, lp_ptr, lse_ptr, tl_ptr, ent_ptr, st_ptr, ws_ptr,
                V, inner_rows, s_outer, s_inner, inv_alpha, ignore_index, split_len,
                SPLITS: tl.constexpr, BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = _row_base(row, inner_rows, s_outer, s_inner)
    c2 = inv_alpha * 1.4426950408889634
    start = split * split_len
    stop = tl.minimum(start + split_len, V)
    # m is the running max of the raw logits (a scalar: one block reduction per chunk); s and w
    # accumulate per lane in base 2, centred on m (so nothing overflows for finite logits and the
    # entropy does not cancel), rescaled by a scalar when m grows, and reduced once at the end.
    m = tl.full((), float("-inf"), tl.float32)
    s_vec = tl.zeros((BLOCK_V,), tl.float32)
    w_vec = tl.zeros((BLOCK_V,), tl.float32)
    for off in range(start, stop, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        z = tl.load(z_ptr + base + cols, mask=cols < stop, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_ref = ref_max(m_new)
        s_vec, w_vec = rescale(s_vec, w_vec, m, m_ref, c2, True, WITH_ENT)
        e, ed = exp_terms(z, m_ref, c2, True)
        s_vec += e
        if WITH_ENT:
            w_vec += ed
        m = m_new
    s = tl.sum(s_vec, 0)
    w = tl.sum(w_vec, 0)
    if SPLITS == 1:
        _finish(z_ptr, t_ptr, lp_ptr, lse_ptr, tl_ptr, ent_ptr, st_ptr, row, base, m, s, w,
                inv_alpha, ignore_index, WITH_ENT)
    else:
        p = ws_ptr + (row.to(tl.int64) * SPLITS + split) * 3
        tl.store(p, m)
        tl.store(p + 1, s)
        tl.store(p + 2, w)


@triton.jit
def _combine_kernel(z_ptr, t_ptr, lp_ptr, lse_ptr, tl_ptr, ent_ptr, st_ptr, ws_ptr,
                    inner_rows, s_outer, s_inner, inv_alpha, ignore_index,
                    SPLITS: tl.constexpr, WITH_ENT: tl.constexpr):
    row = tl.program_id(0)
    base = _row_base(row, inner_rows, s_outer, s_inner)
    k = tl.arange(0, SPLITS)
    p = ws_ptr + (row.to(tl.int64) * SPLITS + k) * 3
    mi = tl.load(p)
    si = tl.load(p + 1)
    wi = tl.load(p + 2)
    m = tl.max(mi, 0)
    si, wi = rescale(si, wi, mi, ref_max(m), inv_alpha * 1.4426950408889634, True, WITH_ENT)
    s = tl.sum(si, 0)
    w = tl.sum(wi, 0)
    _finish(z_ptr, t_ptr, lp_ptr, lse_ptr, tl_ptr, ent_ptr, st_ptr, row, base, m, s, w, inv_alpha,
            ignore_index, WITH_ENT)


@triton.jit
def _bwd_kernel(z_ptr, t_ptr, st_ptr, ent_ptr, glp_ptr, glse_ptr, gtl_ptr, gent_ptr, dz_ptr,
                V, inner_rows, s_outer, s_inner, inv_alpha, ignore_index,
                HAS_LP: tl.constexpr, HAS_LSE: tl.constexpr, HAS_TL: tl.constexpr,
                HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = cols < V
    base = _row_base(row, inner_rows, s_outer, s_inner)
    z = tl.load(z_ptr + base + cols, mask=inb, other=float("-inf")).to(tl.float32)
    m = tl.load(st_ptr + row.to(tl.int64) * 2)
    ln_s = tl.load(st_ptr + row.to(tl.int64) * 2 + 1)
    logp = centred(z, m) * inv_alpha - ln_s                 # log p, centred on the row max
    p = tl.exp(logp)
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    coef = 0.0
    tgt = 0.0
    if HAS_LSE:
        coef += tl.load(glse_ptr + row)
    if HAS_LP:
        glp = tl.where(valid, tl.load(glp_ptr + row), 0.0)
        coef -= glp
        tgt += glp * inv_alpha
    if HAS_TL:
        tgt += tl.where(valid, tl.load(gtl_ptr + row), 0.0)
    g = p * coef
    if HAS_ENT:
        h = tl.load(ent_ptr + row)
        ge = tl.load(gent_ptr + row)
        g -= ge * p * tl.where(p > 0, logp + h, 0.0)
    g = g * inv_alpha
    g = tl.where(valid & (cols == t), g + tgt, g)          # float32 until the single cast below
    tl.store(dz_ptr + row.to(tl.int64) * V + cols, g.to(dz_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------- launchers

# On a GPU the chunk width and warp count are autotuned per (V, dtype, entropy) — the first call at
# a new shape pays for the search. Split lengths are multiples of the largest BLOCK_V, so every
# config tiles every split exactly. The interpreter uses one small fixed config (fast tests).
_MAX_BLOCK = 8192
_FWD_CONFIGS = [triton.Config({"BLOCK_V": b}, num_warps=w) for b in (2048, 4096, 8192) for w in (4, 8, 16)
                if b // (32 * w) >= 8]
_BWD_CONFIGS = [triton.Config({"BLOCK_V": b}, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)
                if b // (32 * w) >= 8]
# ERM_AUTOTUNE=quick / pinned (kernels/autotune.py) search only these, the first one alone if pinned
_FWD_QUICK = [dict(BLOCK_V=8192, num_warps=8), dict(BLOCK_V=4096, num_warps=8),
              dict(BLOCK_V=8192, num_warps=16)]
_BWD_QUICK = [dict(BLOCK_V=4096, num_warps=8), dict(BLOCK_V=8192, num_warps=8),
              dict(BLOCK_V=4096, num_warps=4)]
_fwd_tuned = autotune(_FWD_CONFIGS, key=["V", "SPLITS", "WITH_ENT"], quick=_FWD_QUICK)(_fwd_kernel)
_bwd_tuned = autotune(_BWD_CONFIGS, key=["V", "HAS_LP", "HAS_LSE", "HAS_TL", "HAS_ENT"],
                      quick=_BWD_QUICK)(_bwd_kernel)


def _layout(logits):
    """(tensor, n_rows, V, inner_rows, stride_outer, stride_inner); see kernels/rows.py."""
    z, inner, s_out, s_in = row_layout(logits)
    v = z.shape[-1]
    return z, z.numel() // v, v, inner, s_out, s_in


def _plan(n, v, device, block_v, splits):
    if block_v is None:
        block_v = _MAX_BLOCK if device.type == "cuda" else 64
    if splits is None:
        want = 4 * sm_count(device)  # programs in flight to cover the memory latency
        splits = 1
        if n < want:
            max_splits = max(1, v // block_v)  # at least one full chunk per split
            splits = min(max_splits, triton.next_power_of_2(math.ceil(want / n)))
            splits = 1 << (splits.bit_length() - 1)  # power of two for the combine kernel
    split_len = triton.cdiv(triton.cdiv(v, splits), block_v) * block_v
    splits = triton.cdiv(v, split_len)
    return block_v, max(1, triton.next_power_of_2(splits)) if splits > 1 else 1, split_len


def forward(logits, targets, alpha, ignore_index, with_entropy, *, block_v=None, splits=None):
    """Triton forward. logits (..., V) fp32/bf16/fp16, targets int64 (...) already range-checked.

    Returns float32 (logprob, lse, target_logit, entropy, state) shaped like targets; entropy is
    an empty (0,) tensor unless `with_entropy`; state (N, 2) holds each row's (max, ln s) for the
    backward. `block_v` / `splits` override the launch plan (tests)."""
    z, n, v, inner, s_out, s_in = _layout(logits)
    dev = logits.device
    fixed_block = block_v is not None  # tests pin the block; else autotuned on GPU
    t = targets.reshape(-1).contiguous()
    outs = [_empty(n, dtype=torch.float32, device=dev) for _ in range(3)]
    ent = _empty(n if with_entropy else 0, dtype=torch.float32, device=dev)
    state = _empty((n, 2), dtype=torch.float32, device=dev)
    block_v, n_splits, split_len = _plan(n, v, dev, block_v, splits)
    ws = torch.empty((n, n_splits, 3) if n_splits > 1 else (1,), dtype=torch.float32, device=dev)
    if n_splits > 1:
        ws[:, :, 0] = float("-inf")  # splits past the end of V (power-of-two padding) merge as empty
        ws[:, :, 1:] = 0.0
    ent_arg = ent if with_entropy else outs[0]
    grid = (n, triton.cdiv(v, split_len))
    args = (z, t, outs[0], outs[1], outs[2], ent_arg, state, ws, v, inner, s_out, s_in,
            1.0 / alpha, ignore_index, split_len)
    if dev.type == "cuda" and not fixed_block:
        _fwd_tuned[grid](*args, SPLITS=n_splits, WITH_ENT=with_entropy)
    else:
        _fwd_kernel[grid](*args, SPLITS=n_splits, BLOCK_V=block_v, WITH_ENT=with_entropy,
                          num_warps=8 if dev.type == "cuda" else 1)
    if n_splits > 1:
        _combine_kernel[(n,)](z, t, outs[0], outs[1], outs[2], ent_arg, state, ws, inner, s_out,
                              s_in, 1.0 / alpha, ignore_index, SPLITS=n_splits,
                              WITH_ENT=with_entropy)
    shape = targets.shape
    return (outs[0].view(shape), outs[1].view(shape), outs[2].view(shape),
            ent.view(shape) if with_entropy else ent, state)


def backward(logits, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index, *,
             block_v=None):
    """Triton backward: d(loss)/d(logits) in logits' dtype, shape of logits (contiguous).
    state is the forward's (N, 2); upstream grads are float32 shaped like targets, or None."""
    z, n, v, inner, s_out, s_in = _layout(logits)
    dev = logits.device
    dz = _empty(logits.shape, dtype=logits.dtype, device=dev)
    t = targets.reshape(-1).contiguous()
    flat = lambda g: None if g is None else g.reshape(-1).contiguous()  # noqa: E731
    st = state.contiguous()
    dummy = st
    args = [flat(g) if g is not None else dummy for g in (g_lp, g_lse, g_tl, g_ent)]
    ent_f = flat(ent) if g_ent is not None else dummy
    kargs = (z, t, st, ent_f, *args, dz, v, inner, s_out, s_in, 1.0 / alpha, ignore_index)
    flags = dict(HAS_LP=g_lp is not None, HAS_LSE=g_lse is not None, HAS_TL=g_tl is not None,
                 HAS_ENT=g_ent is not None)
    if dev.type == "cuda" and block_v is None:
        _bwd_tuned[lambda meta: (n, triton.cdiv(v, meta["BLOCK_V"]))](*kargs, **flags)
    else:
        block_v = block_v or 64
        _bwd_kernel[(n, triton.cdiv(v, block_v))](*kargs, **flags, BLOCK_V=block_v,
                                                  num_warps=8 if dev.type == "cuda" else 1)
    return dz
