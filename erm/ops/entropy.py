"""Entropy of softmax(logits/α) per row, without a full-vocabulary softmax and without targets.

    H = lse − Σ_j p_j·x_j,   x = z/α,  p = softmax(x),  lse = logsumexp(x)

`erm.entropy(logits)` is `erm.token_stats(logits, targets, entropy=True).entropy` with every
target equal to `erm.constants.IGNORE_INDEX` (no log-prob is taken; the lse and the entropy of
every row are still computed), so it runs on the same backends (chunked torch on CPU, Triton /
CUDA on GPU) and is differentiable through the entropy for any upstream gradient.
Test: tests/test_trl.py (TRL's entropy_from_logits cases).
"""
import torch
from torch import Tensor

from .. import _checks
from ..constants import IGNORE_INDEX
from .token_stats import token_stats_op


def entropy(logits: Tensor, *, temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """Entropy H(softmax(logits/α)) of each row, in nats.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 on the torch backend); any leading
            shape, a 1-D (V,) tensor included.
        temperature: α > 0.
        backend: "auto" | "cuda" | "triton" | "torch" (see `erm.dispatch`).

    Returns:
        (...) float32 tensor (float64 for float64 logits), differentiable w.r.t. `logits`.

    Raises:
        TypeError: a non-tensor or integer logits.
        ValueError: empty logits, temperature <= 0.
    """
    _checks.check_logits(logits)
    alpha = _checks.check_alpha(temperature)
    backend = _checks.check_backend(backend)
    lead = logits.shape[:-1]
    rows = logits if logits.dim() > 1 else logits.unsqueeze(0)
    targets = torch.full(rows.shape[:-1], IGNORE_INDEX, dtype=torch.long, device=logits.device)
    _, _, _, ent, _ = token_stats_op(rows, targets, alpha, IGNORE_INDEX, True, backend)
    return ent.reshape(lead)
