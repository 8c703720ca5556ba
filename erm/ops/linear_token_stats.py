"""Token statistics and endogenous rewards straight from hidden states and the LM-head weight,
without materialising the N×V logits.

With hidden h (..., D), LM-head weight W (V, D) and optional bias b (V,), centred on the row max
m of z as in `erm.ops.token_stats` (same semantics for infinite logits):

    z = h @ W.T + b,   d = (z − m)/α,   s = Σ e^d,   p = e^d / s
    lse = m/α + log s,   target_logit = z[a],   logprob = min(0, d[a] − log s)   (0 at ignore_index)
    entropy H = log s − Σ p·d

`linear_token_stats(h, W, a, ...)` equals `token_stats(h @ W.T + b, a, ...)`. Backward, for
upstream grads (g_lp, g_lse, g_tl, g_H):

    dz_j = p_j/α·(g_lse − g_lp − g_H·(log p_j + H)) + [j == a]·(g_lp/α + g_tl),
    log p_j = (z_j − m)/α − log s from the saved per-row state (m, log s)
    grad_h = dz @ W,   grad_W = dz.T @ h,   grad_b = Σ_n dz

(ignore_index rows contribute no g_lp / g_tl terms). Backends: `erm.kernels.linear_token_stats`
(Triton; design in its docstring) and a chunked PyTorch path (here) whose float32 logits chunk
stays below `LOGITS_CHUNK_BYTES`. Registered as `erm::linear_token_stats` (+
`erm::linear_token_stats_backward`) with fake kernels and autograd, so `torch.compile(fullgraph=
True)` traces it. Test: tests/test_linear_token_stats.py. Bench: benches/bench_linear_token_stats.py.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _checks, dispatch
from . import torch_impl
from ..constants import IGNORE_INDEX
from .core import flat_rows, ignore_value, reward_args, rewards, shifted_targets
from .token_stats import TokenStats

# ----------------------------------------------------------------------------------------------
# torch backend: token chunks, float32 (float64 for float64 inputs) logits chunk of ≤ CHUNK_BYTES


LOGITS_CHUNK_BYTES = 32 * 2**20  # torch backend: float32 logits of one chunk of tokens


def _rows_per_chunk(v: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * v))


def _chunk_logits(h, w_acc, b_acc):
    h = h.to(w_acc.dtype)
    return h @ w_acc.t() if b_acc is None else torch.addmm(b_acc, h, w_acc.t())


def _torch_forward(hidden, weight, bias, targets, alpha, ignore_index, with_entropy):
    acc = torch_impl.acc_dtype(hidden)
    w_acc = weight.to(acc)  # one copy of W when it is 16-bit (O(V·D), never O(N·V))
    b_acc = None if bias is None else bias.to(acc)
    n, v = hidden.shape[0], weight.shape[0]
    step = _rows_per_chunk(v)
    parts = []
    for s in range(0, n, step):
        z = _chunk_logits(hidden[s:s + step], w_acc, b_acc)
        parts.append(torch_impl.forward(z, targets[s:s + step], alpha, ignore_index, with_entropy))
        del z
    return tuple(torch.cat([p[k] for p in parts]) for k in range(5))


def _torch_backward(hidden, weight, bias, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha,
                    ignore_index, *, need, deterministic=True):
    acc = torch_impl.acc_dtype(hidden)
    need_h, need_w, need_b = need
    need_b = need_b and bias is not None
    w_acc = weight.to(acc)
    b_acc = None if bias is None else bias.to(acc)
    n, d = hidden.shape
    v = weight.shape[0]
    gh = torch.empty((n, d) if need_h else (0,), dtype=acc, device=hidden.device)
    gw = torch.zeros((v, d) if need_w else (0,), dtype=acc, device=hidden.device)
    gb = torch.zeros(v if need_b else 0, dtype=acc, device=hidden.device)
    sl = lambda t, s, e: None if t is None else t[s:e]  # noqa: E731
    step = _rows_per_chunk(v)
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e].to(acc)
        z = _chunk_logits(h, w_acc, b_acc)
        dz = torch_impl.backward(z, targets[s:e], state[s:e], sl(ent, s, e) if g_ent is not None else ent,
                                 sl(g_lp, s, e), sl(g_lse, s, e), sl(g_tl, s, e), sl(g_ent, s, e),
                                 alpha, ignore_index)
        if need_h:
            torch.mm(dz, w_acc, out=gh[s:e])
        if need_w:
            gw.addmm_(dz.t(), h)
        if need_b:
            gb += dz.sum(dim=0)
        del z, dz
    return (gh.to(hidden.dtype), gw.to(weight.dtype),
            gb.to(bias.dtype) if need_b else gb.to(hidden.dtype))


# ----------------------------------------------------------------------------------------------
# dispatch and the torch.library ops


def _torch():
    return _torch_forward, _torch_backward


def _triton():
    from ..kernels import linear_token_stats as k
    return k.forward, k.backward


# The backends of this op (see `dispatch.select`). There is no CUDA C++ kernel of it: "cuda" (and
# "auto" on CUDA tensors) runs the Triton kernels.
BACKENDS = {"torch": _torch, "triton": _triton, "cuda": "triton"}


@torch.library.custom_op("erm::linear_token_stats", mutates_args=())
def linear_token_stats_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          alpha: float, ignore_index: Optional[int], with_entropy: bool,
                          deterministic: bool,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op `erm::linear_token_stats` on checked arguments (what `linear_token_stats` calls
    after its checks; the vocab-parallel op calls it directly).

    hidden (N, D) with a unit last stride (`erm.ops.core.flat_rows`), weight (V, D), bias (V,)
    or None, targets (N,) int64, the scalars checked (ignore_index None: no ignored rows).
    Returns (logprob, lse, target_logit, entropy, state): float32 (float64 for float64 inputs),
    (N,) each, entropy (0,) unless `with_entropy`, state (N, 2) = each row's (max, centred
    log-sum) for the backward. Differentiable w.r.t. hidden, weight and bias."""
    # the one range check of the ids (a device sync), inside the op so torch.compile traces it
    _checks.check_target_range(targets, weight.shape[0], ignore_index)
    _, (fwd, _) = dispatch.select(BACKENDS, backend, hidden.device, hidden.dtype)
    return tuple(fwd(hidden, weight, bias, targets, alpha, ignore_value(ignore_index),
                     with_entropy))


@linear_token_stats_op.register_fake
def _(hidden, weight, bias, targets, alpha, ignore_index, with_entropy, deterministic, backend):
    dt = torch_impl.acc_dtype(hidden)
    n = targets.shape[0]
    mk = lambda *size: hidden.new_empty(size, dtype=dt)  # noqa: E731
    return mk(n), mk(n), mk(n), mk(n if with_entropy else 0), mk(n, 2)


@torch.library.custom_op("erm::linear_token_stats_backward", mutates_args=())
def _linear_token_stats_backward_op(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, state: Tensor,
        ent: Tensor, g_lp: Optional[Tensor], g_lse: Optional[Tensor], g_tl: Optional[Tensor],
        g_ent: Optional[Tensor], alpha: float, ignore_index: Optional[int], need_hidden: bool,
        need_weight: bool, need_bias: bool, deterministic: bool,
        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _, (_, bwd) = dispatch.select(BACKENDS, backend, hidden.device, hidden.dtype)
    acc = torch_impl.acc_dtype(hidden)
    cast = lambda g: None if g is None else g.to(acc).contiguous()  # noqa: E731
    grads = [cast(g) for g in (g_lp, g_lse, g_tl, g_ent)]
    return bwd(hidden, weight, bias, targets, state, ent, *grads, alpha, ignore_value(ignore_index),
               need=(need_hidden, need_weight, need_bias), deterministic=deterministic)


@_linear_token_stats_backward_op.register_fake
def _(hidden, weight, bias, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index,
      need_hidden, need_weight, need_bias, deterministic, backend):
    gh = hidden.new_empty(hidden.shape if need_hidden else (0,))
    gw = weight.new_empty(weight.shape if need_weight else (0,))
    if bias is not None and need_bias:
        gb = bias.new_empty(bias.shape)
    else:
        gb = hidden.new_empty((0,))
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, alpha, ignore_index, with_entropy, deterministic, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[4], output[3])
    ctx.set_materialize_grads(False)  # unused outputs arrive as None: their terms are skipped
    ctx.args = (alpha, ignore_index, with_entropy, deterministic, backend)


def _backward(ctx, g_lp, g_lse, g_tl, g_ent, _g_state):
    hidden, weight, bias, targets, state, ent = ctx.saved_tensors
    alpha, ignore_index, with_entropy, deterministic, backend = ctx.args
    if not with_entropy:
        g_ent = None
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    if all(g is None for g in (g_lp, g_lse, g_tl, g_ent)) or not (need_h or need_w or need_b):
        return (None,) * 9
    gh, gw, gb = _linear_token_stats_backward_op(
        hidden, weight, bias, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index,
        need_h, need_w, need_b, deterministic, backend)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None,
            None, None, None, None, None, None)


linear_token_stats_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def _check_linear_inputs(hidden, weight, bias):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 (or float64), got {t.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    v, d = weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden has D={hidden.shape[-1]} (shape {tuple(hidden.shape)}) but weight "
                         f"has D={d} (shape {tuple(weight.shape)})")
    if v == 0 or d == 0 or hidden.numel() == 0:
        raise ValueError(f"empty input: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias ({bias.dtype}) must have the dtype of hidden ({hidden.dtype})")
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must have shape (V,) = ({v},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def check_linear_args(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets) -> Tensor:
    """The tensors of `linear_token_stats` (and of its vocab-parallel form), checked: raises
    TypeError / ValueError as documented there; returns `targets` as a tensor on hidden's device
    (an int64 tensor with the leading shape of hidden)."""
    _check_linear_inputs(hidden, weight, bias)
    return _checks.check_targets(targets, hidden.shape[:-1], hidden.device)


def linear_token_stats(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                       bias: Optional[Tensor] = None, temperature: float = 1.0,
                       ignore_index: int = IGNORE_INDEX, entropy: bool = False, backend: str = "auto",
                       deterministic: bool = True) -> TokenStats:
    """`erm.token_stats(hidden @ weight.T + bias, targets, ...)` without the N×V logits.

    Args:
        hidden: (..., D) float32, bfloat16 or float16 (float64 on the torch backend): the final
            hidden states (after the last norm).
        weight: (V, D) LM-head weight, same dtype as `hidden`. A weight tied to the input
            embedding works: its gradients from both uses accumulate.
        targets: (...) integer ids with the leading shape of `hidden`; entries equal to
            `ignore_index` are allowed, anything else must lie in [0, V).
        bias: optional (V,) LM-head bias, same dtype.
        temperature: α > 0; statistics are those of softmax(z/α).
        ignore_index: rows with this target get logprob 0, target_logit 0 and no gradient through
            them; their `lse` (and entropy) are still computed.
        entropy: also compute H(softmax(z/α)).
        backend: "auto" | "cuda" | "triton" | "torch". This op has no CUDA C++ kernel: "cuda"
            runs the Triton kernels. "auto" is Triton on CUDA tensors, torch on CPU.
        deterministic: Triton backward only. True (default): bitwise reproducible gradients (a
            bounded dz chunk buffer + fixed-order GEMMs). False: one fused kernel with float32
            atomics, no dz buffer but a float32 V×D weight-grad buffer and run-to-run variation in
            the last bits of the gradients (summation order of the atomics).

    Returns:
        TokenStats(logprob, lse, target_logit, entropy): float32 tensors shaped like `targets`
        (float64 for float64 inputs; `entropy` None unless asked). Differentiable w.r.t. hidden,
        weight and bias through all four outputs; the backward recomputes the logits in tiles from
        hidden, weight and the saved per-row lse (O(N) saved state).

    Raises:
        TypeError: non-tensor inputs, integer hidden/weight, float targets, dtype mismatch between
            hidden, weight and bias.
        ValueError: shape mismatch (hidden D vs weight D, bias V, targets), empty input,
            temperature <= 0, out-of-range target ids.
    """
    targets = check_linear_args(hidden, weight, bias, targets)
    return _linear_token_stats(
        hidden, weight, bias, targets, _checks.check_alpha(temperature),
        _checks.check_ignore_index(ignore_index), _checks.check_flag(entropy, "entropy"),
        _checks.check_flag(deterministic, "deterministic"), _checks.check_backend(backend))


def _linear_token_stats(hidden, weight, bias, targets, alpha: float, ignore_index: Optional[int],
                        entropy: bool, deterministic: bool, backend: str) -> TokenStats:
    """`linear_token_stats` on validated arguments (the reward function calls this directly)."""
    shape = targets.shape
    lp, lse, tz, ent, _ = linear_token_stats_op(flat_rows(hidden), weight, bias, targets.reshape(-1),
                                                alpha, ignore_index, entropy, deterministic,
                                                backend)
    return TokenStats(lp.view(shape), lse.view(shape), tz.view(shape),
                      ent.view(shape) if entropy else None)


def linear_endogenous_rewards(hidden: Tensor, weight: Tensor, input_ids: Tensor, *,
                              bias: Optional[Tensor] = None, response_mask=None,
                              alpha: float = 1.0, gamma: float = 1.0, terminated=True,
                              backend: str = "auto") -> Tensor:
    """`erm.endogenous_rewards(hidden @ weight.T + bias, input_ids, ...)` without the logits.

    Args:
        hidden: (B, T, D) final hidden states over `input_ids`; weight (V, D) and optional bias
            (V,) of the LM head (see `linear_token_stats`).
        input_ids, response_mask, alpha, gamma, terminated, backend: as in
            `erm.endogenous_rewards`.
    Returns:
        (B, T) float32 rewards, 0 outside the mask; differentiable w.r.t. hidden, weight, bias.
    """
    _check_linear_inputs(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    ids = _checks.check_targets(input_ids, hidden.shape[:-1], hidden.device, name="input_ids")
    alpha, gamma, mask, term = reward_args(ids, response_mask, terminated, alpha, gamma)
    st = _linear_token_stats(hidden, weight, bias, shifted_targets(ids), alpha, None, False, True,
                             _checks.check_backend(backend))
    return rewards(st.lse, st.target_logit, mask, term, alpha, gamma)
