"""Vocab-parallel token statistics and endogenous rewards on `torch.distributed`.

When the LM head is sharded over the vocabulary (tensor parallelism as in Megatron, verl, vLLM),
rank r holds the logits (or the LM-head rows) of the vocabulary slice [vocab_start, vocab_start +
V_r); shards may be uneven. Each rank runs erm's fused op on its shard, which gives per row the
raw maximum m_r, the centred log-sum log s_r = log Σ_{j∈r} exp((z_j − m_r)/α), the local entropy
H_r and the target logit when the target falls in its slice. The ranks then communicate, per row:

0. one small all-gather of (vocab_start, V_r, α, rows) and whether the rank's arguments passed
   its checks: when any rank's did not, or the slices do not tile [0, V) without gaps or
   overlaps, a slice is empty, or α or the rows differ between ranks, every rank raises the
   same error (`layout_problem`) instead of one rank raising while its peers wait;
1. one MAX all-reduce of m_r → the global row max m;
2. one SUM all-reduce of (e_r, t_r, o_r, l_r, w_r): the shard's sums moved onto m by the
   online-softmax merge (kernels/merge.py), e_r = s_r·e^{dm_r} and w_r = e^{dm_r}·(Σ e^d·d +
   s_r·dm_r) with dm_r = (m_r − m)/α, s_r = e^{log s_r} and Σ e^d·d = s_r·(log s_r − H_r); on the
   owner of the row's target t_r is the target logit, o_r = 1 and l_r = its local log-prob + d_r,
   d_r = dm_r + log s_r (all 0 elsewhere; l_r serves rows whose max is +inf).

Then S = Σ e_r, lse = m/α + log S, logprob = min(0, (z[a] − m)/α − log S) and H = log S − Σ w_r/S:
the row-max-centred form of the single-process op, so a large common offset of the logits costs
no digits. Every rank gets the full-vocabulary `TokenStats`.

Gradients reach the local shard (and, for the linear op, the local LM-head rows and the
replicated hidden states, whose gradient is SUM all-reduced in the backward). As in Megatron, the
outputs are replicated and every rank computes the same loss from them: the backward of the SUM
all-reduce is the identity, and the max is a constant shift (lse does not depend on it).

    st = vocab_parallel_token_stats(local_logits, targets, vocab_start=rank * v_local)
    st = vocab_parallel_linear_token_stats(hidden, local_weight, targets, vocab_start=...)
    r = vocab_parallel_endogenous_rewards(local_logits, input_ids, vocab_start=...)

Test: tests/test_distributed.py (gloo, 2–4 processes on CPU).
"""
import math
import numbers
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from ..constants import IGNORE_INDEX
from ..kernels.merge import rescale
from .core import flat_rows, reward_args, rewards
from .endogenous import next_token_targets
from .linear_token_stats import check_linear_args, linear_token_stats_op
from .token_stats import TokenStats, token_stats_op

__all__ = ["vocab_parallel_token_stats", "vocab_parallel_linear_token_stats",
           "vocab_parallel_endogenous_rewards", "layout_problem"]

#: Bytes of an argument error that `_shared_error` sends to every rank (type byte + message).
_MESSAGE_BYTES = 1024


class _SumReplicated(torch.autograd.Function):
    """SUM all-reduce whose result every rank uses in the same loss: identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToShards(torch.autograd.Function):
    """Identity forward of a replicated input; its gradient is the SUM over the shards."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first (torchrun sets it up)")
    return group


def _number(x, integral: bool) -> float:
    """`x` as a float for the layout all-gather; NaN when it is not a (integral) real number."""
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(x, bool) or not isinstance(x, kind):
        return math.nan
    return float(x)


def _shared_error(group, device, rank: int, err: Optional[Exception]):
    """The error of `rank` raised on every rank of `group` alike ("rank R: message"): its
    type and message, UTF-8, travel in one fixed-size uint8 all-gather."""
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=device)
    if err is not None:
        raw = bytes([isinstance(err, TypeError)]) + str(err).encode("utf-8")
        raw = raw[:_MESSAGE_BYTES]
        buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    bufs = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(bufs, buf, group=group)
    raw = bytes(bufs[rank].cpu().tolist()).rstrip(b"\0")
    kind = TypeError if raw[:1] == b"\1" else ValueError
    raise kind(f"rank {rank}: {raw[1:].decode('utf-8', errors='replace')}")


def layout_problem(table) -> Optional[str]:
    """What is wrong with the shards of a vocab-parallel group, or None.

    Args:
        table: per rank of the group, [start, size, α, n] (floats): the first vocabulary id of
            its slice, the slice's length, its temperature and its number of target rows.
    Returns:
        None when every slice is non-empty, the slices tile [0, V) without gaps or overlaps,
        and every rank has the same α and n; else a message naming the ranks and values.
    """
    sizes = [int(t[1]) for t in table]
    if 0 in sizes:
        return (f"every rank needs a non-empty vocabulary slice: rank(s) "
                f"{[r for r, v in enumerate(sizes) if v == 0]} hold none")
    alphas = [t[2] for t in table]
    if any(a != alphas[0] for a in alphas):
        return f"the temperature must be the same on every rank, got {alphas} (rank by rank)"
    rows = [int(t[3]) for t in table]
    if any(n != rows[0] for n in rows):
        return f"the targets must be the same on every rank, got {rows} rows (rank by rank)"
    slices = [(int(t[0]), int(t[1])) for t in table]
    end = 0
    for rank, (start, size) in sorted(enumerate(slices), key=lambda x: x[1]):
        if start != end:
            what = (f"ids [{end}, {start}) are in no slice" if start > end else
                    f"ids [{start}, {min(end, start + size)}) are in two slices")
            return (f"the vocabulary slices must tile [0, V) without gaps or overlaps: {what} "
                    f"(rank {rank} starts at {start}); (vocab_start, size) by rank: {slices}")
        end = start + size
    return None


def _agreed(group, lead, check: Callable, vocab_start, size, temperature, targets):
    """`check()` (this rank's argument checks) and one small all-gather of (ok, vocab_start,
    size, α, target rows) by which every rank of `group` raises the same error when any rank
    rejected its arguments or the slices do not fit together (`layout_problem`); returns what
    `check()` returned."""
    try:
        out, err = check(), None
    except (TypeError, ValueError) as exc:
        out, err = None, exc
    device = lead.device if isinstance(lead, Tensor) else torch.device("cpu")
    rows = targets.numel() if isinstance(targets, Tensor) else -1
    row = torch.tensor([err is None, _number(vocab_start, True), size,
                        _number(temperature, False), rows], dtype=torch.float64, device=device)
    table = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, row, group=group)
    table = torch.stack(table).cpu().tolist()
    failed = [r for r, t in enumerate(table) if not t[0]]
    if failed:
        _shared_error(group, device, failed[0], err)
    problem = layout_problem([t[1:] for t in table])
    if problem is not None:
        raise ValueError(problem)
    return out


def _check_args(temperature, ignore_index, entropy, backend, vocab_start):
    """The scalar arguments of the vocab-parallel ops, checked: (α, ignore_index, entropy,
    backend, vocab_start)."""
    return (_checks.check_alpha(temperature), _checks.check_ignore_index(ignore_index),
            _checks.check_flag(entropy, "entropy"), _checks.check_backend(backend),
            _checks.check_int(vocab_start, "vocab_start", 0))


def _local_targets(targets: Tensor, vocab_start: int, v_local: int, ignore_index: int):
    """(the targets of this shard, others → IGNORE_INDEX; rows with a target; rows whose target
    this shard owns)."""
    valid = targets != ignore_index
    own = valid & (targets >= vocab_start) & (targets < vocab_start + v_local)
    local = torch.where(own, targets - vocab_start, torch.full_like(targets, IGNORE_INDEX))
    return local, valid, own


def _combine(local, state, valid, own, alpha, group, want_entropy):
    """Full-vocabulary TokenStats from each row's local (logprob, lse, target logit, entropy)
    and state (m, log s): one MAX and one SUM all-reduce (see the module docstring). The SUM also
    counts the owners of each row's target: a target no shard owns is out of range."""
    lp_r, lse_r, tz_r, ent_r = local
    state = state.detach().reshape(*lse_r.shape, 2)  # constants: gradients flow through lse_r
    m_r, logs_r = state[..., 0], state[..., 1]
    m = m_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    finite = torch.isfinite(m)
    zero = torch.zeros_like(m)
    # log s_r = lse_r − m_r/α: its value from the centred state, its gradient that of lse_r
    log_s_r = logs_r + torch.where(torch.isfinite(lse_r), lse_r - lse_r.detach(), zero)
    s_r = torch.exp(log_s_r)
    # Σ e^d·d of the shard = s_r·(log s_r − H_r); 0 for a shard without mass (H_r is NaN there)
    w_r = s_r * torch.where(s_r > 0, log_s_r - ent_r, zero) if want_entropy else None
    # a row whose max is infinite: only the shards holding that max keep mass (dm = −inf else)
    dm, e, w = rescale(m_r, s_r, w_r, m, alpha)
    d = dm + log_s_r                                                  # log e_r
    parts = [e, torch.where(own, tz_r, zero), own.to(e.dtype), torch.where(own, lp_r + d, zero)]
    if want_entropy:
        parts.append(w)
    total = _SumReplicated.apply(torch.stack(parts, -1), group)
    s, tz = total[..., 0], total[..., 1]
    orphan = valid & (total[..., 2].detach() != 1)
    if bool(orphan.any()):
        raise ValueError(f"{int(orphan.sum())} target id(s) lie in no rank's vocabulary slice "
                         "(out of range)")
    log_s = torch.log(s)
    m_a = m / alpha
    lse = torch.where(finite, m_a + log_s, m)
    # finite max: the single-process form (z[a] − m)/α − log S; infinite max: the owner's local
    # log-prob moved to the global normaliser (its own form for infinite logits)
    lp = torch.where(finite, (tz - m) / alpha - log_s, total[..., 3] - log_s)
    lp = torch.where(valid, torch.clamp_max(lp, 0.0), zero)
    ent = log_s - total[..., 4] / s if want_entropy else None
    return TokenStats(lp, lse, torch.where(valid, tz, zero), ent)


def vocab_parallel_token_stats(logits: Tensor, targets: Tensor, *, vocab_start: int, group=None,
                               temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                               entropy: bool = False, backend: str = "auto") -> TokenStats:
    """`erm.token_stats` over a vocabulary sharded across the ranks of `group`.

    Args:
        logits: (..., V_local) this rank's logits of the vocabulary slice
            [vocab_start, vocab_start + V_local); float32 / bfloat16 / float16.
        targets: (...) global token ids (int64), the same on every rank; `ignore_index` allowed.
        vocab_start: first global id of this rank's slice (slices may be uneven).
        group: the process group of the shards (default: the whole world).
        temperature, ignore_index, entropy, backend: as in `erm.token_stats` (local kernels).
    Returns:
        TokenStats of the full vocabulary, float32 shaped like `targets`, identical on every
        rank; differentiable w.r.t. the local logits (every rank computing the same loss).
    Raises:
        RuntimeError: torch.distributed not initialised. TypeError / ValueError, on every rank
        alike ("rank R: ..." for an argument one rank rejected): as `erm.token_stats`, a bad
        vocab_start, an empty slice, slices with gaps or overlaps, a temperature or a number of
        target rows that differs between ranks (one all-gather before the kernels), a target
        that no rank's slice holds (found by the SUM all-reduce).
    """
    _check_group(group)

    def check():
        if isinstance(logits, Tensor) and logits.dim() >= 1 and logits.shape[-1] == 0:
            raise ValueError(f"this rank's vocabulary slice is empty (logits shape "
                             f"{tuple(logits.shape)}): every rank needs at least one id")
        _checks.check_logits(logits)
        return (_checks.check_targets(targets, logits.shape[:-1], logits.device),
                *_check_args(temperature, ignore_index, entropy, backend, vocab_start))

    size = logits.shape[-1] if isinstance(logits, Tensor) and logits.dim() >= 1 else -1
    targets, alpha, ii, entropy, backend, start = _agreed(group, logits, check, vocab_start,
                                                          size, temperature, targets)
    local, valid, own = _local_targets(targets, start, logits.shape[-1], ii)
    *outs, state = token_stats_op(logits, local, alpha, IGNORE_INDEX, entropy, backend)
    return _combine(outs, state, valid, own, alpha, group, entropy)


def vocab_parallel_linear_token_stats(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                                      vocab_start: int, group=None, bias: Optional[Tensor] = None,
                                      temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                                      entropy: bool = False,
                                      backend: str = "auto") -> TokenStats:
    """`erm.linear_token_stats` with the LM head sharded by rows across the ranks of `group`.

    Args:
        hidden: (..., D) final hidden states, replicated on every rank.
        weight: (V_local, D) this rank's rows [vocab_start, vocab_start + V_local) of the LM head;
            bias: its (V_local,) slice or None.
        targets, vocab_start, group, temperature, ignore_index, entropy, backend: as in
            `vocab_parallel_token_stats`.
    Returns:
        TokenStats of the full vocabulary on every rank; differentiable w.r.t. hidden (its
        gradient SUM all-reduced over the shards), the local weight rows and bias. The local
        N×V_local logits are never materialised beyond the fused op's tiles.
    Raises:
        as `vocab_parallel_token_stats` (and `erm.linear_token_stats` for the tensors).
    """
    _check_group(group)

    def check():
        if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] == 0:
            raise ValueError("this rank's vocabulary slice is empty (weight shape "
                             f"{tuple(weight.shape)}): every rank needs at least one row")
        return (check_linear_args(hidden, weight, bias, targets),
                *_check_args(temperature, ignore_index, entropy, backend, vocab_start))

    size = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else -1
    targets, alpha, ii, entropy, backend, start = _agreed(group, hidden, check, vocab_start,
                                                          size, temperature, targets)
    local, valid, own = _local_targets(targets, start, weight.shape[0], ii)
    h = flat_rows(_CopyToShards.apply(hidden, group))
    outs = linear_token_stats_op(h, weight, bias, local.reshape(-1), alpha, IGNORE_INDEX,
                                 entropy, True, backend)
    st = _combine(outs[:4], outs[4], valid.reshape(-1), own.reshape(-1), alpha, group, entropy)
    shape = targets.shape
    return TokenStats(*(None if x is None else x.view(shape) for x in st))


def vocab_parallel_endogenous_rewards(logits: Optional[Tensor], input_ids: Tensor, *,
                                      vocab_start: int, group=None,
                                      hidden: Optional[Tensor] = None,
                                      weight: Optional[Tensor] = None,
                                      bias: Optional[Tensor] = None, response_mask=None,
                                      alpha: float = 1.0, gamma: float = 1.0, terminated=True,
                                      backend: str = "auto") -> Tensor:
    """`erm.endogenous_rewards` (or, with `hidden` and `weight` instead of `logits`,
    `erm.linear_endogenous_rewards`) over a vocabulary sharded across `group`.

    Args:
        logits: (B, T, V_local) this rank's logits, or None when hidden/weight are given.
        input_ids: (B, T) global ids, the same on every rank.
        hidden, weight, bias: (B, T, D) replicated hidden states and this rank's LM-head rows.
        response_mask, alpha, gamma, terminated: as in `erm.endogenous_rewards`.
    Returns:
        (B, T) float32 rewards of the full vocabulary, identical on every rank.
    """
    if (logits is None) == (hidden is None or weight is None):
        raise ValueError("give either logits or both hidden and weight")
    lead = logits if logits is not None else hidden
    if lead.dim() != 3:
        raise ValueError(f"expected (B, T, ·) inputs, got shape {tuple(lead.shape)}")
    ids = _checks.check_targets(input_ids, lead.shape[:-1], lead.device, name="input_ids")
    alpha, gamma, mask, term = reward_args(ids, response_mask, terminated, alpha, gamma)
    nxt = next_token_targets(ids)
    kw = dict(vocab_start=vocab_start, group=group, temperature=alpha, backend=backend)
    if logits is not None:
        st = vocab_parallel_token_stats(logits, nxt, **kw)
    else:
        st = vocab_parallel_linear_token_stats(hidden, weight, nxt, bias=bias, **kw)
    return rewards(st.lse, st.target_logit, mask, term, alpha, gamma)
