"""The online-softmax merge of partial sums in torch, for the host-side combines: the per-chunk
partials of the fused LM-head forward (kernels/linear_token_stats.py) and the per-shard states of
the vocab-parallel ops (erm/ops/vocab_parallel.py). Torch only, no Triton: the vocab-parallel ops
import it on machines without Triton. The math, and the same merge in the Triton kernels, are in
kernels/common.py.
"""
from typing import Optional

import torch
from torch import Tensor


def rescale(m: Tensor, s: Tensor, w: Optional[Tensor], m_ref: Tensor, alpha: float):
    """Partial sums centred on their own maxima, moved onto a reference max.

    Args:
        m: (..., N) raw maxima m_i of the parts (any leading shape broadcasting with `m_ref`).
        s, w: the parts' s_i = Σ e^d and w_i = Σ e^d·d (d = (z − m_i)/α), shaped like `m`, float;
            `w` None when no entropy is wanted.
        m_ref: the reference max (≥ every m_i it is broadcast against), e.g. the row max.
        alpha: the temperature α.
    Returns:
        (dm, s', w'), shaped like `m`: dm_i = (m_i − m_ref)/α (0 where m_i == m_ref, so a part
        holding an infinite max gets 0, and −inf for a part below an infinite m_ref), s'_i =
        s_i·e^{dm_i} and w'_i = e^{dm_i}·(w_i + s_i·dm_i) (0 where e^{dm_i} = 0; None when `w` is
        None). Σ_i s'_i and Σ_i w'_i are the s and w of the union centred on m_ref. Differentiable
        in s and w, with no NaN gradient from the parts that carry no weight.
    """
    dm = torch.where(m == m_ref, 0.0, m - m_ref) / alpha
    f = torch.exp(dm)
    if w is None:
        return dm, s * f, None
    live = f > 0
    dm_live = torch.where(live, dm, 0.0)  # keeps s·dm finite (and its gradient) where f = 0
    return dm, s * f, torch.where(live, f * (w + s * dm_live), 0.0)
