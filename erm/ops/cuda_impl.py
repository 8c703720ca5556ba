"""The `cuda` backend of `erm::token_stats`: the compiled kernels of csrc/token_stats.cu.

Importing `erm._C` registers `torch.ops.erm_C.token_stats_fwd` / `token_stats_bwd` (CUDA only).
This module gives them the contract of the torch backend in `erm.ops.token_stats`
(`_torch_forward` / `_torch_backward`): logits (..., V) float32/bfloat16/float16 with any strides
whose leading dims collapse to rows, or a (B, T, V) tensor with arbitrary outer strides such as
`logits[:, :-1]`, are read in place; other layouts are copied once.
"""
import torch

from .. import dispatch
from ..kernels.rows import row_layout

_FAKES_REGISTERED = False


def _ops():
    """torch.ops.erm_C, after loading erm._C (raises if it is not built)."""
    global _FAKES_REGISTERED
    if dispatch.cuda_extension() is None:
        raise RuntimeError("the CUDA extension erm._C is not built "
                           "(reinstall with ERM_BUILD_CUDA=1 pip install --no-build-isolation .)")
    if not _FAKES_REGISTERED:
        _FAKES_REGISTERED = True
        _register_fakes()
    return torch.ops.erm_C


def _register_fakes():
    """Meta/fake kernels so the raw ops can be traced too (erm::token_stats already has one)."""
    try:
        @torch.library.register_fake("erm_C::token_stats_fwd")
        def _(logits, targets, alpha, ignore_index, with_entropy, inner_rows, stride_outer,
              stride_inner):
            n = targets.numel()
            mk = lambda *k: logits.new_empty(k, dtype=torch.float32)  # noqa: E731
            return mk(n), mk(n), mk(n), mk(n if with_entropy else 0), mk(n, 2)

        @torch.library.register_fake("erm_C::token_stats_bwd")
        def _(logits, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index,
              inner_rows, stride_outer, stride_inner):
            return logits.new_empty((targets.numel(), logits.shape[-1]))
    except Exception:  # already registered (module reloaded) or an older torch: not essential
        pass


def forward(logits, targets, alpha, ignore_index, with_entropy):
    """CUDA forward: float32 (logprob, lse, target_logit, entropy, state): the first four shaped
    like targets (entropy an empty (0,) tensor when with_entropy is False), state (N, 2) the
    per-row (max, ln s) the backward reads."""
    ops = _ops()
    z, inner, s_outer, s_inner = row_layout(logits)
    t = _flat_targets(targets)
    lp, lse, tz, ent, state = ops.token_stats_fwd(z, t, float(alpha), int(ignore_index),
                                                  bool(with_entropy), int(inner), int(s_outer),
                                                  int(s_inner))
    shape = targets.shape
    return (lp.view(shape), lse.view(shape), tz.view(shape),
            ent.view(shape) if with_entropy else ent, state)


def _flat_targets(targets):
    return targets.reshape(-1).long().contiguous()


def _rows(t):
    if t is None:
        return None
    return t.reshape(-1).to(torch.float32).contiguous()


def backward(logits, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index):
    """CUDA backward: d(loss)/d(logits), logits.shape and logits.dtype, contiguous. Upstream grads
    are float32 shaped like targets, or None (zero)."""
    ops = _ops()
    z, inner, s_outer, s_inner = row_layout(logits)
    t = _flat_targets(targets)
    if g_ent is None:
        ent_rows = state.new_empty((0,), dtype=torch.float32)
    else:
        ent_rows = _rows(ent)
    grad = ops.token_stats_bwd(z, t, state.to(torch.float32).contiguous(), ent_rows, _rows(g_lp), _rows(g_lse), _rows(g_tl),
                               _rows(g_ent), float(alpha), int(ignore_index), int(inner),
                               int(s_outer), int(s_inner))
    return grad.view(logits.shape)
