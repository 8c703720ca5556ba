"""The endogenous reward: a causal LM's logits read as a soft Q-function (arXiv 2506.23235).

With logits z_t at position t, temperature α and discount γ:

    soft value   V(s_t) = α·logsumexp(z_t/α)
    token reward r_t    = z_{t−1}[a_t] − γ·V(s_{t+1}),   V(s_{t+1}) = α·logsumexp(z_t/α)

after the last response token V(s_{t+1}) = 0 if the sequence terminated (EOS) and the soft value
of the next position otherwise. With γ = 1 the rewards of a response sum to α·log π(y|x) + V(s_1):
the sum telescopes. Everything is computed by `erm.token_stats` (one fused pass over the logits)
and a few (B, T) tensor ops (`erm.ops.core.rewards`, shared with the linear and vocab-parallel
reward functions). Test: tests/test_endogenous.py.
"""
import torch
from torch import Tensor

from .. import _checks
from ..constants import IGNORE_INDEX
from .core import check_first_position, reward_args, rewards, shifted_targets
from .token_stats import token_stats_op


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
    _, lse, _, _, _ = token_stats_op(logits, targets, alpha, IGNORE_INDEX, False,
                                     _checks.check_backend(backend))
    return alpha * lse


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
    alpha, gamma, mask, term = reward_args(ids, response_mask, terminated, alpha, gamma)
    _, lse, target_logit, _, _ = token_stats_op(logits, shifted_targets(ids), alpha, None, False,
                                                _checks.check_backend(backend))
    return rewards(lse, target_logit, mask, term, alpha, gamma)


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
    lse, target_logit = getattr(stats, "lse", None), getattr(stats, "target_logit", None)
    if not (isinstance(lse, Tensor) and isinstance(target_logit, Tensor)) or lse.dim() != 2 \
            or lse.shape != target_logit.shape:
        raise TypeError("stats must have (B, W) tensors .lse and .target_logit")
    b, w = lse.shape
    alpha, gamma = _checks.check_alpha(alpha, "alpha"), _checks.check_gamma(gamma)
    mask = _checks.as_bool_tensor(response_mask, (b, w), "response_mask", lse.device)
    check_first_position(mask)
    term = _checks.as_terminated(terminated, b, lse.device)
    return rewards(lse, target_logit, mask, term, alpha, gamma)
