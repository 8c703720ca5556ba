"""The endogenous reward: a causal LM's logits read as a soft Q-function (arXiv 2506.23235).

With logits z_t at position t, temperature α and discount γ:

    soft value   V(s_t) = α·logsumexp(z_t/α)
    token reward r_t    = z_{t−1}[a_t] − γ·V(s_{t+1}),   V(s_{t+1}) = α·logsumexp(z_t/α)

after the last response token V(s_{t+1}) = 0 if the sequence terminated (EOS) and the soft value
of the next position otherwise. With γ = 1 the rewards of a response sum to α·log π(y|x) + V(s_1):
the sum telescopes. Everything is computed by `erm.token_stats` (one fused pass over the logits)
and a few (B, T) tensor ops (`rewards_from_stats`). Test: tests/test_endogenous.py.
"""
import torch
from torch import Tensor

from .. import _checks
from ..constants import IGNORE_INDEX
from .token_stats import _token_stats


def soft_values(logits: Tensor, *, alpha: float = 1.0, backend: str = "auto") -> Tensor:
    """Soft value α·logsumexp(logits/α) per position.

    Args:
        logits: (..., V) float32 / bfloat16 / float16.
        alpha: temperature α ≥ `erm.constants.MIN_TEMPERATURE`.
    Returns:
        (...) float32, differentiable w.r.t. logits.
    """
    _checks.check_logits(logits)
    alpha = _checks.check_alpha(alpha, "alpha")
    targets = torch.full(logits.shape[:-1], IGNORE_INDEX, dtype=torch.long, device=logits.device)
    return alpha * _token_stats(logits, targets, alpha, IGNORE_INDEX, False,
                                _checks.check_backend(backend)).lse


def next_token_targets(ids: Tensor) -> Tensor:
    """(B, T) next-token targets of (B, T) ids: position t holds ids[t+1], the last position
    `IGNORE_INDEX` (token stats over these are what `rewards_from_stats` reads)."""
    pad = torch.full((ids.shape[0], 1), IGNORE_INDEX, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids[:, 1:], pad], 1)


def endogenous_rewards(logits: Tensor, input_ids: Tensor, *, response_mask=None,
                       alpha: float = 1.0, gamma: float = 1.0, terminated=True,
                       backend: str = "auto") -> Tensor:
    """Per-token endogenous rewards of the tokens in `input_ids` under the LM that produced `logits`.

    Args:
        logits: (B, T, V) causal-LM logits over `input_ids` (position t predicts token t+1);
            float32 / bfloat16 / float16.
        input_ids: (B, T) integer token ids in [0, V).
        response_mask: (B, T) bools (a tensor, nested list or NumPy array; 0/1 integers too),
            True on the tokens to reward. Default: every position but the first. Position 0 has
            no preceding state and cannot be rewarded.
        alpha: temperature α ≥ `erm.constants.MIN_TEMPERATURE` of the soft Q-function.
        gamma: discount γ (a finite real) applied to the next state's soft value.
        terminated: one bool for all rows, or B per-row bools (list, tuple, NumPy array or
            tensor); True when a sequence's last response token ended it (EOS), so the value
            after it is 0; False (truncated) uses the soft value there.
    Returns:
        (B, T) float32: position t holds r_t = z_{t−1}[input_ids[t]] − γ·V(s_{t+1}) inside the
        mask, 0 elsewhere. Differentiable w.r.t. logits.
    """
    _checks.check_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    ids = _checks.check_targets(input_ids, logits.shape[:-1], logits.device, name="input_ids")
    alpha, gamma, mask, term = _reward_args(ids, response_mask, terminated, alpha, gamma)
    st = _token_stats(logits, _shifted(ids), alpha, None, False, _checks.check_backend(backend))
    return _rewards(st, mask, term, alpha, gamma)


def _reward_args(ids: Tensor, response_mask, terminated, alpha, gamma):
    """Validated (alpha, gamma, (B, T) mask, (B,) terminated) of the reward functions (shared
    with `erm.linear_endogenous_rewards`)."""
    alpha = _checks.check_alpha(alpha, "alpha")
    gamma = _checks.check_gamma(gamma)
    b, t = ids.shape
    if response_mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        mask[:, 0] = False
    else:
        mask = _checks.as_bool_tensor(response_mask, (b, t), "response_mask", ids.device)
        _check_first_position(mask)
    return alpha, gamma, mask, _checks.as_terminated(terminated, b, ids.device)


def _check_first_position(mask: Tensor):
    if bool(mask[:, 0].any()):
        raise ValueError("response_mask marks position 0, which has no preceding state")


def _shifted(ids: Tensor) -> Tensor:
    """ids shifted left by one, wrapping around: index t holds ids[t+1]. The op range-checks every
    id this way (ignore_index None), and the last column's target is never read."""
    return torch.roll(ids, -1, dims=1)


def rewards_from_stats(stats, response_mask, terminated, *, alpha: float,
                       gamma: float = 1.0) -> Tensor:
    """Endogenous rewards from token stats already computed over next-token targets.

    Args:
        stats: a `TokenStats` (or anything with `.lse` and `.target_logit`) over (B, W)
            positions, where index t holds target_logit = z_t[ids[t+1]] and lse =
            logsumexp(z_t/α): the stats of `next_token_targets(ids)` (IGNORE_INDEX at the last
            position) at temperature α.
        response_mask: (B, W) bools marking the positions t of the rewarded tokens; never
            position 0 (no preceding state in the window).
        terminated: a bool, or B per-row bools: the last response token ended the sequence.
        alpha, gamma: as in `endogenous_rewards` (α must be the stats' temperature).
    Returns:
        (B, W) float32 r_t = z_{t−1}[ids[t]] − γ·V(s_{t+1}), 0 outside the mask.
    """
    lse, tl = getattr(stats, "lse", None), getattr(stats, "target_logit", None)
    if not (isinstance(lse, Tensor) and isinstance(tl, Tensor)) or lse.dim() != 2 \
            or lse.shape != tl.shape:
        raise TypeError("stats must have (B, W) tensors .lse and .target_logit")
    b, w = lse.shape
    alpha, gamma = _checks.check_alpha(alpha, "alpha"), _checks.check_gamma(gamma)
    mask = _checks.as_bool_tensor(response_mask, (b, w), "response_mask", lse.device)
    _check_first_position(mask)
    return _rewards(stats, mask, _checks.as_terminated(terminated, b, lse.device), alpha, gamma)


def _rewards(st, mask: Tensor, term: Tensor, alpha: float, gamma: float) -> Tensor:
    """(B, W) rewards from the token stats of the next-token targets, on validated arguments."""
    b, t = mask.shape
    value = alpha * st.lse                                            # V(s_{t+1}) at index t
    tl = st.target_logit
    q = torch.cat([tl.new_zeros(b, 1), tl[:, :-1]], 1)                # z_{t-1}[a_t]
    pos = torch.arange(t, device=mask.device)
    last = (mask * pos).amax(dim=1, keepdim=True)                     # last response position
    is_last = mask & (pos == last)
    next_value = torch.where(is_last & term.unsqueeze(1), torch.zeros_like(value), value)
    r = q - gamma * next_value
    return torch.where(mask, r, torch.zeros_like(r))
