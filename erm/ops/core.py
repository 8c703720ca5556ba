"""What several ops of erm share: the ignore value the kernels compare with, the (N, D) rows of
hidden states, and the endogenous-reward pieces of `erm.endogenous_rewards`,
`erm.linear_endogenous_rewards` and `erm.vocab_parallel_endogenous_rewards` (the math is in
erm/ops/endogenous.py). Every name here is used by more than one op module; what one op alone
uses stays in its own module.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _checks


def ignore_value(ignore_index: Optional[int]) -> int:
    """The ignore value the kernels compare with: None (no ignored rows, every target was checked
    to lie in [0, V)) becomes -1, which no target equals."""
    return -1 if ignore_index is None else ignore_index


def flat_rows(hidden: Tensor) -> Tensor:
    """(N, D) rows of (..., D) hidden states with a unit last stride (a copy only when needed)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    return h if h.stride(-1) == 1 else h.contiguous()


def reward_args(ids: Tensor, response_mask, terminated, alpha, gamma):
    """The reward functions' arguments, checked: (α, γ, (B, T) bool mask, (B,) bool terminated)
    for (B, T) `ids`. The default mask is every position but the first."""
    alpha = _checks.check_alpha(alpha, "alpha")
    gamma = _checks.check_gamma(gamma)
    b, t = ids.shape
    if response_mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        mask[:, 0] = False
    else:
        mask = _checks.as_bool_tensor(response_mask, (b, t), "response_mask", ids.device)
        check_first_position(mask)
    return alpha, gamma, mask, _checks.as_terminated(terminated, b, ids.device)


def check_first_position(mask: Tensor):
    """A ValueError when a (B, T) response mask marks position 0 (no preceding state)."""
    if bool(mask[:, 0].any()):
        raise ValueError("response_mask marks position 0, which has no preceding state")


def shifted_targets(ids: Tensor) -> Tensor:
    """(B, T) ids shifted left by one, wrapping around: index t holds ids[t+1]. The ops range-check
    every id this way (ignore_index None), and the last column's target is never read."""
    return torch.roll(ids, -1, dims=1)


def rewards(lse: Tensor, target_logit: Tensor, mask: Tensor, term: Tensor, alpha: float,
            gamma: float) -> Tensor:
    """(B, W) float32 rewards r_t = z_{t−1}[a_t] − γ·V(s_{t+1}), 0 outside `mask`, from the
    (B, W) lse and target logits of the next-token targets (index t: logsumexp(z_t/α) and
    z_t[ids[t+1]]), on checked arguments: `mask` (B, W) bool, `term` (B,) bool."""
    b, t = mask.shape
    value = alpha * lse                                               # V(s_{t+1}) at index t
    q = torch.cat([target_logit.new_zeros(b, 1), target_logit[:, :-1]], 1)  # z_{t-1}[a_t]
    pos = torch.arange(t, device=mask.device)
    last = (mask * pos).amax(dim=1, keepdim=True)                     # last response position
    is_last = mask & (pos == last)
    next_value = torch.where(is_last & term.unsqueeze(1), torch.zeros_like(value), value)
    r = q - gamma * next_value
    return torch.where(mask, r, torch.zeros_like(r))
