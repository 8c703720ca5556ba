"""The endogenous reward: a causal LM's logits read as a soft Q-function (arXiv 2506.23235).

With logits z_t at position t, temperature α and discount γ:

    soft value   V(s_t) = α·logsumexp(z_t/α)
    token reward r_t    = z_{t−1}[a_t] − γ·V(s_{t+1}),   V(s_{t+1}) = α·logsumexp(z_t/α)

after the last response token V(s_{t+1}) = 0 if the sequence terminated (EOS) and the soft value
of the next position otherwise. With γ = 1 the rewards of a response sum to α·log π(y|x) + V(s_1):
the sum telescopes. Everything is computed by `erm.token_stats` (one fused pass over the logits)
and a few (B, T) tensor ops. Test: tests/test_endogenous.py.
"""
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _checks
from .token_stats import token_stats

_IGNORE = -100


def soft_values(logits: Tensor, *, alpha: float = 1.0, backend: str = "auto") -> Tensor:
    """Soft value α·logsumexp(logits/α) per position.

    Args:
        logits: (..., V) float32 / bfloat16 / float16.
        alpha: temperature α > 0.
    Returns:
        (...) float32, differentiable w.r.t. logits.
    """
    _checks.check_logits(logits)
    alpha = _checks.check_alpha(alpha, "alpha")
    targets = torch.full(logits.shape[:-1], _IGNORE, dtype=torch.long, device=logits.device)
    return alpha * token_stats(logits, targets, temperature=alpha, ignore_index=_IGNORE,
                               backend=backend).lse


def endogenous_rewards(logits: Tensor, input_ids: Tensor, *, response_mask: Optional[Tensor] = None,
                       alpha: float = 1.0, gamma: float = 1.0,
                       terminated: Union[bool, Tensor] = True, backend: str = "auto") -> Tensor:
    """Per-token endogenous rewards of the tokens in `input_ids` under the LM that produced `logits`.

    Args:
        logits: (B, T, V) causal-LM logits over `input_ids` (position t predicts token t+1);
            float32 / bfloat16 / float16.
        input_ids: (B, T) integer token ids in [0, V).
        response_mask: (B, T) bool (or 0/1), True on the tokens to reward. Default: every position
            but the first. Position 0 has no preceding state and cannot be rewarded.
        alpha: temperature α > 0 of the soft Q-function.
        gamma: discount γ applied to the next state's soft value.
        terminated: bool or (B,) bool tensor; True when a sequence's last response token ended it
            (EOS), so the value after it is 0; False (truncated) uses the soft value there.
    Returns:
        (B, T) float32: position t holds r_t = z_{t−1}[input_ids[t]] − γ·V(s_{t+1}) inside the
        mask, 0 elsewhere. Differentiable w.r.t. logits.
    """
    _checks.check_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    ids = _checks.check_targets(input_ids, logits.shape[:-1], logits.device, name="input_ids")
    alpha = _checks.check_alpha(alpha, "alpha")
    mask, term, nxt = _reward_setup(ids, logits.shape[-1], response_mask, gamma, terminated)
    st = token_stats(logits, nxt, temperature=alpha, ignore_index=_IGNORE, backend=backend)
    return _rewards_from_stats(st, mask, term, alpha, gamma)


def _reward_setup(ids: Tensor, v: int, response_mask, gamma, terminated):
    """Validate the reward arguments for (B, T) ids over a vocabulary of v; return the response
    mask, the (B,) terminated flags and the next-token targets (shared with
    `erm.linear_endogenous_rewards`)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a float, got {type(gamma).__name__}")
    b, t = ids.shape
    device = ids.device
    if response_mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=device)
        mask[:, 0] = False
    else:
        if not isinstance(response_mask, Tensor) or tuple(response_mask.shape) != (b, t):
            raise ValueError(f"response_mask must be a (B, T) = {(b, t)} tensor")
        mask = response_mask.to(device=device, dtype=torch.bool)
        if bool(mask[:, 0].any()):
            raise ValueError("response_mask marks position 0, which has no preceding state")
    if isinstance(terminated, Tensor):
        if terminated.shape != (b,):
            raise ValueError(f"terminated must be a bool or a (B,) = ({b},) tensor")
        term = terminated.to(device=device, dtype=torch.bool)
    else:
        term = torch.full((b,), bool(terminated), dtype=torch.bool, device=device)
    _checks.check_target_range(ids, v, ignore_index=-(2**62), name="input_ids")
    # next-token targets: position t scores input_ids[t+1]; the last position has none
    nxt = torch.cat([ids[:, 1:], torch.full((b, 1), _IGNORE, dtype=ids.dtype, device=ids.device)], 1)
    return mask, term, nxt


def next_token_targets(ids: Tensor) -> Tensor:
    """(B, T) next-token targets of (B, T) ids: position t holds ids[t+1], the last IGNORE_INDEX."""
    pad = torch.full((ids.shape[0], 1), _IGNORE, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids[:, 1:], pad], 1)


def rewards_from_stats(stats, response_mask: Tensor, terminated, *, alpha: float,
                       gamma: float = 1.0) -> Tensor:
    """(B, W) float32 rewards r_t = z_{t-1}[ids[t]] - gamma*V(s_{t+1}) from token stats over the
    next-token targets (`next_token_targets`), 0 outside `response_mask`."""
    alpha = _checks.check_alpha(alpha, "alpha")
    b, t = stats.lse.shape
    mask = response_mask.to(device=stats.lse.device, dtype=torch.bool)
    if isinstance(terminated, Tensor):
        term = terminated.to(device=mask.device, dtype=torch.bool)
    else:
        term = torch.full((b,), bool(terminated), dtype=torch.bool, device=mask.device)
    return _rewards_from_stats(stats, mask, term, alpha, gamma)


def _rewards_from_stats(st, mask: Tensor, term: Tensor, alpha: float, gamma: float) -> Tensor:
    """(B, T) rewards from the token stats of the next-token targets (see `_reward_setup`)."""
    b, t = mask.shape
    value = alpha * st.lse                                            # V(s_{t+1}) at index t
    q = torch.cat([st.target_logit.new_zeros(b, 1), st.target_logit[:, :-1]], 1)  # z_{t-1}[a_t]
    pos = torch.arange(t, device=mask.device)
    last = (mask * pos).amax(dim=1, keepdim=True)                     # last response position
    is_last = mask & (pos == last)
    next_value = torch.where(is_last & term.unsqueeze(1), torch.zeros_like(value), value)
    r = q - gamma * next_value
    return torch.where(mask, r, torch.zeros_like(r))
