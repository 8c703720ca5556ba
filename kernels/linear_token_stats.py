"""Triton kernels of `erm.linear_token_stats`: token statistics straight from hidden states and the
LM-head weight, without an N×V logits tensor.

z = hidden @ weight.T + bias, x = z/α, p = softmax(x) (math in erm/ops/linear_token_stats.py).

Forward (`forward`): programs own a (BLOCK_N tokens) × (one vocabulary chunk) rectangle and walk
its BLOCK_V tiles; each logit tile is a tl.dot over D in BLOCK_D steps with float32 accumulation
(input_precision="ieee" for float32 inputs, so no TF32 rounding). The online max m of the raw
logits, s = Σ e^d and w = Σ e^d·d with d = (z − m)/α ≤ 0 (centred first: no overflow, no lost
digits at large offsets, no cancellation in the entropy) are merged across tiles and the target
logit is picked in the same pass. When N is
small, V is split into several chunks (one program each) so the grid still fills the GPU; the
per-chunk partials (m, s, w, z[a]) of shape (chunks, N) are merged by a tiny O(chunks·N) torch
combine. Programs are ordered in groups of GROUP_N token blocks × all chunks, so the programs that
run together share their hidden tiles (L2) and each weight tile is fetched from HBM N/(GROUP_N·
BLOCK_N) times. Only O(N) floats (the row state (m, ln s) and the entropy) are saved for the
backward.

Backward (`backward`), given the saved state (and entropy), with log p = (z − m)/α − ln s:

    dz = p/α·(c − g_H·(log p + H)) + [j == a]·t,   c = g_lse − g_lp,  t = g_lp/α + g_tl

* deterministic=True (default): the vocabulary is walked in chunks of Vc columns (Vc chosen so the
  N×Vc dz buffer stays under `DZ_BUDGET_BYTES`, 256 MiB by default). For each chunk a Triton
  kernel recomputes the logit tiles from hidden and weight and writes dz (in the input dtype, as
  the tensor-core GEMMs consume it), then two cuBLAS GEMMs finish the chunk:
  grad_weight[chunk] = dzᵀ @ hidden (written once; K = N is accumulated in float32 inside the
  GEMM) and grad_hidden += dz @ weight[chunk] (float32 accumulator, N×D). grad_bias[chunk] =
  Σ_n dz. Every reduction has a fixed order, so results are bitwise reproducible. Cost: 3 matmuls
  + writing/reading dz once (N·V·2 bytes each way for bf16).
  (Why not one grad_hidden kernel owning token blocks and one grad_weight kernel owning vocab
  blocks, each recomputing the logits? Their accumulators are BLOCK×D with D in the thousands: they
  do not fit in registers, and read-modify-writing them in global memory once per tile moves
  ~N·V·D·8/BLOCK bytes, ≈280 GB at N=8192, V=152k, D=3584 — slower than 4 matmuls.)
* deterministic=False (fast mode): one kernel per (token tile, vocab tile) recomputes the logit
  tile, forms dz in registers, and for each D block atomically adds dz @ W_tile into a float32
  grad_hidden (N×D) and dzᵀ @ H_tile into a float32 grad_weight (V×D). No dz buffer and no extra
  pass, but float atomics make the summation order (hence the last bits) vary run to run, and the
  float32 grad_weight buffer costs V·D·4 bytes.

Under TRITON_INTERPRET=1 (CPU tests) every kernel runs with one small fixed config.
"""
import os

import torch
import triton
import triton.language as tl

from .autotune import autotune
from .common import centred, exp_terms, ref_max, rescale, sm_count
from .merge import rescale as rescale_partials

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DZ_BUDGET_BYTES = 256 * 2**20  # bound on the dz chunk buffer of the deterministic backward
TARGET_PROGRAMS = None          # forward: aim for at least this many programs (None: 4 × SMs)
GROUP_N = 16                    # token blocks per program group (L2 reuse of hidden tiles)
# vocab chunks are multiples of the largest BLOCK_V among the configs
_V_ALIGN = 32 if INTERPRET else 256


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1,
                              num_stages=1)]
    cfgs = []
    for bn, bv, bd, w, s in [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 4), (256, 128, 64, 8, 4),
        (128, 64, 128, 4, 4),
        # float32 inputs use input_precision="ieee" (FMA, not tensor cores): the larger tiles
        # above spill registers at sm_90 (ptxas), these two do not
        (64, 64, 32, 4, 3), (64, 64, 64, 4, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w,
                                  num_stages=s))
    return cfgs


# ERM_AUTOTUNE=quick / pinned (kernels/autotune.py) search only these, the first one alone if
# pinned; the last is the float32 ("ieee") tile that does not spill
_QUICK = [dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=w, num_stages=s) for bn, bv, bd, w, s
          in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 64, 64, 4, 3)]]


@triton.jit
def _pid_map(pid, nb, n_cols, GROUP: tl.constexpr):
    """Grouped program order: GROUP token blocks vary fastest, then the column index."""
    per_group = GROUP * n_cols
    g = pid // per_group
    first = g * GROUP
    gsize = tl.minimum(nb - first, GROUP)
    local = pid % per_group
    return first + local % gsize, local // gsize


@triton.jit
def _row_block(pid_n, N, BLOCK_N: tl.constexpr):
    """Token rows of block pid_n: indices, in-range mask, and indices clamped into range (int64,
    so loads need no row mask)."""
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < N, tl.minimum(rows, N - 1).to(tl.int64)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, D, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """z[rows, cols] = hidden[rows] @ weight[cols].T (+ bias) as a float32 (BLOCK_N, BLOCK_V) tile.
    rows/cols are clamped in-range int64 indices, so no row/col masks are needed on the loads."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_d[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_w + offs_d[:, None]  # (BLOCK_D, BLOCK_V) view of W
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            dm = (d0 + offs_d) < D
            h = tl.load(h_ptrs, mask=dm[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=dm[:, None], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bfloat16 (products are exact in fp32)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return acc


def _heuristics(fn):
    return triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})(fn)


@autotune(configs=_configs(), key=["D", "V", "HAS_BIAS", "WITH_ENT"], quick=_QUICK)
@_heuristics
@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, e_ptr, z_ptr,
                N, V, D, stride_h, stride_w, inv_alpha, v_chunk, n_chunks,
                HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr,
                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    nb = tl.cdiv(N, BLOCK_N)
    pid_n, pid_c = _pid_map(tl.program_id(0), nb, n_chunks, GROUP)
    rows, row_ok, rows_c = _row_block(pid_n, N, BLOCK_N)
    tgt = tl.load(t_ptr + rows_c)
    neg_inf = float("-inf")
    m = tl.full((BLOCK_N,), neg_inf, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    tz = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = pid_c * v_chunk
    v_hi = tl.minimum(V, v_lo + v_chunk)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols_c = tl.minimum(cols, V - 1).to(tl.int64)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, D, stride_h, stride_w, HAS_BIAS,
                         BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, PRECISION, UPCAST)
        hit = (cols[None, :] == tgt[:, None]) & col_ok[None, :]
        tz += tl.sum(tl.where(hit, z, 0.0), axis=1)
        x = tl.where(col_ok[None, :], z, neg_inf)       # raw logits; the max is taken raw
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = ref_max(m_new)
        s, w = rescale(s, w, m, m_ref, inv_alpha, False, WITH_ENT)
        ex, exd = exp_terms(x, m_ref[:, None], inv_alpha, False)
        s += tl.sum(ex, axis=1)
        if WITH_ENT:
            w += tl.sum(exd, axis=1)
        m = m_new
    out = pid_c.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(z_ptr + out, tz, mask=row_ok)
    if WITH_ENT:
        tl.store(e_ptr + out, w, mask=row_ok)


@triton.jit
def _dz_tile(z, rows_c, cols, row_ok, col_ok, t_ptr, st_ptr, c_ptr, gh_ptr, ent_ptr, tw_ptr,
             inv_alpha, WITH_ENT: tl.constexpr):
    """dz = p/α·(c − g_H·(log p + H)) + [j == a]·t, zero outside the valid rows/cols; the per-row
    terms are loaded at the clamped rows rows_c; log p = (z − m)/α − ln s from the state."""
    tgt = tl.load(t_ptr + rows_c)
    m = tl.load(st_ptr + rows_c * 2)
    ln_s = tl.load(st_ptr + rows_c * 2 + 1)
    c = tl.load(c_ptr + rows_c)
    gh = tl.load(gh_ptr + rows_c)
    ent = tl.load(ent_ptr + rows_c)
    tw = tl.load(tw_ptr + rows_c)
    logp = centred(z, m[:, None]) * inv_alpha - ln_s[:, None]
    p = tl.exp(logp)
    coef = c[:, None] + tl.zeros_like(logp)
    if WITH_ENT:
        coef = coef - gh[:, None] * (logp + ent[:, None])
    ok = row_ok[:, None] & col_ok[None, :]
    dz = tl.where(ok & (p > 0), p * coef, 0.0) * inv_alpha
    hit = (cols[None, :] == tgt[:, None]) & ok
    return dz + tl.where(hit, tw[:, None], 0.0)


@autotune(configs=_configs(), key=["D", "V", "HAS_BIAS", "WITH_ENT"], quick=_QUICK)
@_heuristics
@triton.jit
def _dz_kernel(h_ptr, w_ptr, b_ptr, t_ptr, st_ptr, c_ptr, gh_ptr, ent_ptr, tw_ptr, dz_ptr,
               N, V, D, stride_h, stride_w, stride_dz, inv_alpha, v_lo, v_len,
               HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr,
               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """dz[:, j − v_lo] for the columns j in [v_lo, v_lo + v_len), from recomputed logit tiles."""
    nb = tl.cdiv(N, BLOCK_N)
    pid_n, pid_v = _pid_map(tl.program_id(0), nb, tl.cdiv(v_len, BLOCK_V), GROUP)
    _, row_ok, rows_c = _row_block(pid_n, N, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_lo + local
    col_ok = local < v_len
    cols_c = tl.minimum(cols, V - 1).to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, D, stride_h, stride_w, HAS_BIAS,
                     BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, PRECISION, UPCAST)
    dz = _dz_tile(z, rows_c, cols, row_ok, col_ok, t_ptr, st_ptr, c_ptr, gh_ptr, ent_ptr, tw_ptr,
                  inv_alpha, WITH_ENT)
    ptrs = dz_ptr + rows_c[:, None] * stride_dz + local[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@autotune(configs=_configs(), key=["D", "V", "HAS_BIAS", "WITH_ENT"], quick=_QUICK,
                 reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"])
@_heuristics
@triton.jit
def _bwd_atomic_kernel(h_ptr, w_ptr, b_ptr, t_ptr, st_ptr, c_ptr, gh_ptr, ent_ptr, tw_ptr,
                       dh_ptr, dw_ptr, db_ptr, N, V, D, stride_h, stride_w, inv_alpha,
                       HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr,
                       NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Fast mode: dz tile in registers, float32 atomics into dh (N×D), dw (V×D), db (V)."""
    nb = tl.cdiv(N, BLOCK_N)
    pid_n, pid_v = _pid_map(tl.program_id(0), nb, tl.cdiv(V, BLOCK_V), GROUP)
    _, row_ok, rows_c = _row_block(pid_n, N, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols_c = tl.minimum(cols, V - 1).to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, D, stride_h, stride_w, HAS_BIAS,
                     BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, PRECISION, UPCAST)
    dz = _dz_tile(z, rows_c, cols, row_ok, col_ok, t_ptr, st_ptr, c_ptr, gh_ptr, ent_ptr, tw_ptr,
                  inv_alpha, WITH_ENT)
    if NEED_B:
        tl.atomic_add(db_ptr + cols_c, tl.sum(dz, axis=0), mask=col_ok)
    dzc = dz.to(h_ptr.dtype.element_ty)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        dm = d < D
        if NEED_H:
            w = tl.load(w_ptr + cols_c[:, None] * stride_w + d[None, :], mask=dm[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            part = tl.dot(dzc.to(w.dtype), w, input_precision=PRECISION)
            tl.atomic_add(dh_ptr + rows_c[:, None] * D + d[None, :], part,
                          mask=row_ok[:, None] & dm[None, :])
        if NEED_W:
            h = tl.load(h_ptr + rows_c[:, None] * stride_h + d[None, :], mask=dm[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            part = tl.dot(tl.trans(dzc.to(h.dtype)), h, input_precision=PRECISION)
            tl.atomic_add(dw_ptr + cols_c[:, None] * D + d[None, :], part,
                          mask=col_ok[:, None] & dm[None, :])


# ----------------------------------------------------------------------------------------------
# host side


def _prep(hidden, weight, bias):
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return hidden, weight, bias


def _precision(dtype):
    return "ieee" if dtype == torch.float32 or _upcast(dtype) else "tf32"


def _upcast(dtype):
    return INTERPRET and dtype == torch.bfloat16


def _fwd_chunks(n, v, device):
    """Vocab chunk width (a multiple of _V_ALIGN) so that token blocks × chunks fills the GPU."""
    target = TARGET_PROGRAMS if TARGET_PROGRAMS is not None else 4 * sm_count(device)
    nb = triton.cdiv(n, 16 if INTERPRET else 128)
    want = max(1, min(triton.cdiv(target, nb), triton.cdiv(v, _V_ALIGN)))
    chunk = triton.cdiv(triton.cdiv(v, want), _V_ALIGN) * _V_ALIGN
    return chunk, triton.cdiv(v, chunk)


def forward(hidden, weight, bias, targets, alpha: float, ignore_index: int, with_entropy: bool):
    """hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) int64 (validated).

    Returns float32 (logprob, lse, target_logit, entropy, state): (N,) each, entropy (0,) if not
    asked, state (N, 2) the per-row (max, ln s) for the backward."""
    hidden, weight, bias = _prep(hidden, weight, bias)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    chunk, n_chunks = _fwd_chunks(n, v, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    m = torch.empty((n_chunks, n), **f32)
    s = torch.empty((n_chunks, n), **f32)
    w = torch.empty((n_chunks, n) if with_entropy else (1,), **f32)
    tz = torch.empty((n_chunks, n), **f32)
    targets = targets.contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_chunks,)  # noqa: E731
    _fwd_kernel[grid](hidden, weight, bias if bias is not None else hidden, targets, m, s, w, tz,
                      n, v, d, hidden.stride(0), weight.stride(0), 1.0 / alpha, chunk, n_chunks,
                      HAS_BIAS=bias is not None, WITH_ENT=with_entropy,
                      PRECISION=_precision(hidden.dtype), UPCAST=_upcast(hidden.dtype),
                      GROUP=GROUP_N)
    return _combine(m, s, w, tz, targets, alpha, ignore_index, with_entropy)


def _combine(m, s, w, tz, targets, alpha, ignore_index, with_entropy):
    """Merge the per-chunk partials (chunks, N) into the outputs (O(chunks·N))."""
    mx = m.amax(dim=0)
    mx = torch.where(mx == float("-inf"), 0.0, mx)
    _, s_ref, w_ref = rescale_partials(m, s, w if with_entropy else None, mx, alpha)
    ssum = s_ref.sum(dim=0)
    ln_s = torch.log(ssum)
    valid = targets != ignore_index
    target_logit = torch.where(valid, tz.sum(dim=0), 0.0)
    lp = torch.where(target_logit == mx, 0.0, target_logit - mx) / alpha - ln_s
    logprob = torch.where(valid, torch.where(lp > 0, 0.0, lp), 0.0)  # ≤ 0; NaN stays NaN
    if with_entropy:
        ent = ln_s - w_ref.sum(dim=0) / ssum
    else:
        ent = torch.empty(0, dtype=torch.float32, device=m.device)
    return logprob, mx / alpha + ln_s, target_logit, ent, torch.stack([mx, ln_s], dim=1)


def _row_coefs(targets, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index, with_ent):
    """Per-row float32 coefficients of dz: c, g_H, H, t (all (N,))."""
    n = targets.shape[0]
    z = torch.zeros(n, dtype=torch.float32, device=targets.device)
    valid = targets != ignore_index
    c = z if g_lse is None else g_lse.float()
    tw = z
    if g_lp is not None:
        glp = torch.where(valid, g_lp.float(), 0.0)
        c = c - glp
        tw = tw + glp / alpha
    if g_tl is not None:
        tw = tw + torch.where(valid, g_tl.float(), 0.0)
    tw = torch.where(valid, tw, 0.0)
    gh = g_ent.float().contiguous() if with_ent else z
    e = ent.float().contiguous() if with_ent else z
    return c.contiguous(), gh, e, tw.contiguous()


_OUT_DTYPE_OK = None


def _f32_gemm_ok(a):
    return a.device.type == "cuda" and a.dtype != torch.float32 and _OUT_DTYPE_OK is not False


def _addmm_f32(acc, a, b):
    """acc (float32) += a @ b, with a float32 GEMM output on CUDA for 16-bit inputs (cuBLAS
    `out_dtype`, torch >= 2.8); elsewhere the product is rounded to the input dtype first."""
    global _OUT_DTYPE_OK
    if _f32_gemm_ok(a):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_OK = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_OK = False
    acc += (a @ b).float()


def _mm_into(out, a, b):
    """out = a @ b with the K reduction in float32 also for 16-bit inputs on CUDA (cuBLAS may
    otherwise reduce split-K partials in bf16/fp16), rounded once to out's dtype."""
    global _OUT_DTYPE_OK
    if _f32_gemm_ok(a):
        try:
            out.copy_(torch.mm(a, b, out_dtype=torch.float32))
            _OUT_DTYPE_OK = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_OK = False
    torch.mm(a, b, out=out)


def backward(hidden, weight, bias, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha: float,
             ignore_index: int, need=(True, True, True), deterministic: bool = True):
    """Gradients (grad_hidden (N, D), grad_weight (V, D), grad_bias (V,)) in the input dtypes;
    a gradient not in `need` (or grad_bias without bias) is returned as an empty (0,) tensor."""
    hidden, weight, bias = _prep(hidden, weight, bias)
    n, d = hidden.shape
    v = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    need_h, need_w, need_b = need
    need_b = need_b and bias is not None
    with_ent = g_ent is not None
    c, gh, e, tw = _row_coefs(targets, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index,
                              with_ent)
    state = state.float().contiguous()
    targets = targets.contiguous()
    b_arg = bias if bias is not None else hidden
    common = dict(HAS_BIAS=bias is not None, WITH_ENT=with_ent, PRECISION=_precision(dt),
                  UPCAST=_upcast(dt), GROUP=GROUP_N)
    empty = lambda t: torch.empty(0, dtype=t.dtype, device=dev)  # noqa: E731

    if not deterministic:
        f32 = dict(dtype=torch.float32, device=dev)
        dh = torch.zeros((n, d) if need_h else (1,), **f32)
        dw = torch.zeros((v, d) if need_w else (1,), **f32)
        db = torch.zeros(v if need_b else 1, **f32)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
        _bwd_atomic_kernel[grid](hidden, weight, b_arg, targets, state, c, gh, e, tw, dh, dw, db,
                                 n, v, d, hidden.stride(0), weight.stride(0), 1.0 / alpha,
                                 NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, **common)
        return (dh.to(dt) if need_h else empty(hidden), dw.to(weight.dtype) if need_w else empty(weight),
                db.to(bias.dtype) if need_b else empty(hidden))

    # deterministic: vocabulary chunks of vc columns; dz chunk (N, vc) in the input dtype
    elt = hidden.element_size()
    vc = max(_V_ALIGN, (DZ_BUDGET_BYTES // max(1, n * elt)) // _V_ALIGN * _V_ALIGN)
    vc = min(vc, triton.cdiv(v, _V_ALIGN) * _V_ALIGN)
    n_chunks = triton.cdiv(v, vc)
    dz = torch.empty((n, min(vc, v)), dtype=dt, device=dev)
    gw = torch.empty((v, d), dtype=weight.dtype, device=dev) if need_w else empty(weight)
    gb = torch.empty(v, dtype=bias.dtype, device=dev) if need_b else empty(hidden)
    acc_h = None
    if need_h and n_chunks > 1:
        acc_h = torch.zeros((n, d), dtype=torch.float32, device=dev)
    gh_out = None
    for i in range(n_chunks):
        v_lo = i * vc
        v_len = min(vc, v - v_lo)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v_len, meta["BLOCK_V"]),)  # noqa: E731
        _dz_kernel[grid](hidden, weight, b_arg, targets, state, c, gh, e, tw, dz,
                         n, v, d, hidden.stride(0), weight.stride(0), dz.stride(0), 1.0 / alpha,
                         v_lo, v_len, **common)
        dzc = dz[:, :v_len]
        if need_w:
            _mm_into(gw[v_lo:v_lo + v_len], dzc.t(), hidden)
        if need_b:
            gb[v_lo:v_lo + v_len] = dzc.sum(dim=0, dtype=torch.float32)
        if need_h:
            w_c = weight[v_lo:v_lo + v_len]
            if acc_h is None:
                gh_out = dzc @ w_c
            else:
                _addmm_f32(acc_h, dzc, w_c)
    if need_h and acc_h is not None:
        gh_out = acc_h.to(dt)
    return (gh_out if need_h else empty(hidden), gw, gb)
