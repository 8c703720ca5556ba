"""Per-token statistics of a softmax policy, straight from logits, without a full-vocab softmax.

For logits z (..., V) at temperature α and targets a (...), with m the row max of z:

    lse          = logsumexp(z/α) = m/α + log s,   s = Σ_j exp((z_j − m)/α)
    target_logit = z[a]
    logprob      = min(0, (z[a] − m)/α − log s)  (0 where a == ignore_index)
    entropy      = H(softmax(z/α)) = log s − Σ_j p_j·(z_j − m)/α

Every backend computes in this form, centred on the row max, carried separately from log s: a
large common offset of the logits (±1e4) costs no digits and no finite logit overflows. The
forward also returns each row's state (m, log s), two floats that autograd saves for the backward,
which recomputes p_j = exp((z_j − m)/α − log s) from the logits (O(N) saved state).

Non-finite logits, the same on every backend: a −inf logit has probability 0 (and no gradient);
if a row's max is +inf, its +inf entries share the probability mass equally (the limit of those
logits growing together): lse = +inf, logprob = −log k for a target among the k +inf entries and
−inf otherwise, entropy = log k. A row whose logits are all −inf has no distribution: lse = −inf,
logprob (valid target), entropy and the gradient are NaN. NaN logits give NaN statistics.

Kernels: `erm.kernels.token_stats` (Triton, one read of the logits in forward, one in backward),
`erm._C` (CUDA C++, csrc/token_stats.cu) and `erm.ops.torch_impl` (chunked PyTorch, CPU);
`BACKENDS` below is the table `erm.dispatch.select` picks from.
The op is registered with torch.library as `erm::token_stats` (+ `erm::token_stats_backward`),
with a fake implementation and autograd, so `torch.compile(fullgraph=True)` traces it.
Test: tests/test_token_stats.py. Bench: benches/bench_token_stats.py.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _checks, dispatch
from ..constants import IGNORE_INDEX
from . import torch_impl
from .core import ignore_value


class TokenStats(NamedTuple):
    """Outputs of `erm.token_stats`, each float32 with the shape of `targets` (float64 for float64
    logits). `entropy` is None unless requested."""

    logprob: Tensor
    lse: Tensor
    target_logit: Tensor
    entropy: Optional[Tensor]


def _rows(logits: Tensor):
    """(N, V) view of logits when the leading dims collapse without a copy, else None."""
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return None


def _torch_forward(logits, targets, alpha, ignore_index, with_entropy):
    v = logits.shape[-1]
    rows = _rows(logits)
    if rows is not None:
        outs = torch_impl.forward(rows, targets.reshape(-1), alpha, ignore_index, with_entropy)
    else:  # e.g. logits[:, :-1] of a (B, T, V) tensor: walk the first dim, each slice is a view
        parts = [torch_impl.forward(logits[i].reshape(-1, v), targets[i].reshape(-1), alpha,
                                    ignore_index, with_entropy) for i in range(logits.shape[0])]
        outs = tuple(torch.cat([p[k] for p in parts]) for k in range(5))
    shape = targets.shape
    lp, lse, tz, ent, state = outs
    return (lp.view(shape), lse.view(shape), tz.view(shape),
            ent.view(shape) if with_entropy else ent, state)


def _torch_backward(logits, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index):
    v = logits.shape[-1]
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    rows = _rows(logits)
    if rows is None:
        rows = logits.reshape(-1, v)  # rare layouts; a copy in the input dtype, not float32
    g = torch_impl.backward(rows, targets.reshape(-1), state, flat(ent), flat(g_lp), flat(g_lse),
                            flat(g_tl), flat(g_ent), alpha, ignore_index)
    return g.view(logits.shape)


def _torch():
    return _torch_forward, _torch_backward


def _triton():
    from ..kernels import token_stats as k
    return k.forward, k.backward


def _cuda():
    from . import cuda_impl
    return cuda_impl.forward, cuda_impl.backward


# The backends of this op: name -> () -> (forward, backward); `dispatch.select` picks one.
BACKENDS = {"torch": _torch, "triton": _triton, "cuda": _cuda}


def _measure_key(logits, with_entropy):
    """What the cuda-vs-triton timing depends on: device, dtype, V, a power-of-two rows bucket."""
    rows = max(1, logits.numel() // logits.shape[-1])
    return ("token_stats", str(logits.device), logits.dtype, logits.shape[-1],
            1 << (rows - 1).bit_length(), bool(with_entropy))


@torch.library.custom_op("erm::token_stats", mutates_args=())
def token_stats_op(logits: Tensor, targets: Tensor, alpha: float, ignore_index: Optional[int],
                   with_entropy: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op `erm::token_stats` on checked arguments (what `token_stats` calls after its
    checks; the other ops that read token statistics call it directly).

    logits (..., V) as in `token_stats`, targets (...) int64 with its leading shape, α a checked
    float, ignore_index an int or None (no ignored rows: every target is range-checked), backend
    a checked name. Returns (logprob, lse, target_logit, entropy, state), float32 (float64 for
    float64 logits): the first three shaped like targets, entropy too when `with_entropy` (else
    an empty (0,) tensor), state (N, 2) = each row's (max, centred log-sum), what the backward
    needs besides the logits (see erm/ops/torch_impl.py). Differentiable w.r.t. logits."""
    # the one range check of the ids (a device sync), inside the op so torch.compile traces it
    _checks.check_target_range(targets, logits.shape[-1], ignore_index)
    ii = ignore_value(ignore_index)
    _, (fwd, _) = dispatch.select(
        BACKENDS, backend, logits.device, logits.dtype, key=_measure_key(logits, with_entropy),
        measure=lambda pair: lambda: pair[0](logits, targets, alpha, ii, with_entropy))
    return tuple(fwd(logits, targets, alpha, ii, with_entropy))


@token_stats_op.register_fake
def _(logits, targets, alpha, ignore_index, with_entropy, backend):
    dt = torch_impl.acc_dtype(logits)
    mk = lambda shape: logits.new_empty(shape, dtype=dt)  # noqa: E731
    return (mk(targets.shape), mk(targets.shape), mk(targets.shape),
            mk(targets.shape if with_entropy else (0,)), mk((targets.numel(), 2)))


@torch.library.custom_op("erm::token_stats_backward", mutates_args=())
def _token_stats_backward_op(logits: Tensor, targets: Tensor, state: Tensor, ent: Tensor,
                             g_lp: Optional[Tensor], g_lse: Optional[Tensor],
                             g_tl: Optional[Tensor], g_ent: Optional[Tensor], alpha: float,
                             ignore_index: Optional[int], backend: str) -> Tensor:
    acc = torch_impl.acc_dtype(logits)
    cast = lambda g: None if g is None else g.to(acc).contiguous()  # noqa: E731
    grads = [cast(g) for g in (g_lp, g_lse, g_tl, g_ent)]
    ii = ignore_value(ignore_index)
    # the backward is timed on its own key: it may favour the other backend
    key = ("backward",) + _measure_key(logits, ent.numel() > 0) + tuple(g is not None for g in grads)
    _, (_, bwd) = dispatch.select(
        BACKENDS, backend, logits.device, logits.dtype, key=key,
        measure=lambda pair: lambda: pair[1](logits, targets, state, ent, *grads, alpha, ii))
    return bwd(logits, targets, state, ent, *grads, alpha, ii)


@_token_stats_backward_op.register_fake
def _(logits, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, targets, alpha, ignore_index, with_entropy, backend = inputs
    ctx.save_for_backward(logits, targets, output[4], output[3])
    ctx.set_materialize_grads(False)  # unused outputs arrive as None: the kernel skips their terms
    ctx.args = (alpha, ignore_index, with_entropy, backend)


def _backward(ctx, g_lp, g_lse, g_tl, g_ent, _g_state):
    logits, targets, state, ent = ctx.saved_tensors
    alpha, ignore_index, with_entropy, backend = ctx.args
    if not with_entropy:
        g_ent = None
    grad = _token_stats_backward_op(logits, targets, state, ent, g_lp, g_lse, g_tl, g_ent, alpha,
                                    ignore_index, backend)
    return grad, None, None, None, None, None


token_stats_op.register_autograd(_backward, setup_context=_setup_context)


def token_stats(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                ignore_index: int = IGNORE_INDEX, entropy: bool = False,
                backend: str = "auto") -> TokenStats:
    """Log-prob, logsumexp, target logit and (optionally) entropy per token, from logits.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 on the torch backend). Any strides
            with a unit last stride avoid copies; (B, T, V) slices such as `logits[:, :-1]` too.
        targets: (...) integer ids (int64) with the leading shape of `logits`; entries equal to
            `ignore_index` are allowed, anything else must lie in [0, V).
        temperature: α, a finite real ≥ `erm.constants.MIN_TEMPERATURE` (1e-4); statistics are
            those of softmax(logits/α).
        ignore_index: an int (int64 range); rows with this target get logprob 0, target_logit 0
            and no gradient through them; their `lse` (and entropy) are still computed.
        entropy: (bool) also compute H(softmax(logits/α)).
        backend: "auto" | "cuda" | "triton" | "torch" (see `erm.dispatch`).

    Returns:
        TokenStats(logprob, lse, target_logit, entropy): float32 tensors shaped like `targets`
        (`entropy` is None unless asked); logprob ≤ 0 always. Differentiable w.r.t. `logits`
        through all four, for any upstream gradient; the backward recomputes from the logits and
        the saved per-row (max, log s). Infinite logits: see the module docstring.

    Raises:
        TypeError: non-tensor inputs, integer logits, float targets, a non-int ignore_index, a
            non-bool entropy, a non-real temperature.
        ValueError: shape mismatch, empty input, temperature < MIN_TEMPERATURE or not finite,
            out-of-range target ids or ignore_index, unknown backend.
    """
    _checks.check_logits(logits)
    targets = _checks.check_targets(targets, logits.shape[:-1], logits.device)
    alpha = _checks.check_alpha(temperature)
    ii = _checks.check_ignore_index(ignore_index)
    entropy = _checks.check_flag(entropy, "entropy")
    lp, lse, tz, ent, _ = token_stats_op(logits, targets, alpha, ii, entropy,
                                         _checks.check_backend(backend))
    return TokenStats(lp, lse, tz, ent if entropy else None)


def token_logprobs(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                   ignore_index: int = IGNORE_INDEX, backend: str = "auto") -> Tensor:
    """log softmax(logits/α)[targets] per token: (...) float32, 0 at ignore_index.

    A drop-in for TRL's `selective_log_softmax(logits, index)` and for
    `-F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction='none')`, without the
    full-vocabulary log-softmax. Arguments as in `token_stats`."""
    return token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index,
                       backend=backend).logprob
