"""What the Triton kernel modules (token_stats, linear_token_stats) share: the device functions of
the online-softmax merge, and the launch planners' view of the GPU.

A part of a row summarised by (m, s, w), its raw max m, s = Σ e^d and w = Σ e^d·d with
d = (z − m)/α, moves onto a reference max m_ref ≥ m by dm = (m − m_ref)/α and f = e^dm:

    s → s·f,   w → f·(w + s·dm)

and the sums of the moved parts are the (s, w) of the whole row (lse = m/α + ln s, entropy
ln s − w/s). `rescale` and `exp_terms` below are that merge in the kernels' loops (in base 2 where
a kernel works in base 2: dm and d scaled by log2(e), e^x replaced by 2^x); kernels/merge.py
is the same merge in torch, and csrc/token_stats.cu has its own (`acc_merge`).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def centred(z, m):
    """z − m, with (+inf) − (+inf) taken as 0: entries equal to an infinite row max share the
    probability mass (see erm/ops/token_stats.py)."""
    return tl.where(z == m, 0.0, z - m)


@triton.jit
def ref_max(m):
    """The max the sums are centred on: m, or 0 while everything seen is −inf (keeps e^d finite)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _exp(x, BASE2: tl.constexpr):
    if BASE2:
        return tl.exp2(x)
    else:
        return tl.exp(x)


@triton.jit
def rescale(s, w, m, m_ref, c, BASE2: tl.constexpr, WITH_ENT: tl.constexpr):
    """Partial sums (s, w) centred on m, moved onto m_ref: (s·f, f·(w + s·dm)) with dm =
    centred(m, m_ref)·c (c = 1/α, or log2(e)/α in base 2) and f = e^dm (2^dm); a part with f = 0
    (nothing seen yet, or below an infinite m_ref) contributes 0 to w. w is returned unchanged
    unless WITH_ENT."""
    dm = centred(m, m_ref) * c
    f = _exp(dm, BASE2)
    if WITH_ENT:
        w = tl.where(f > 0, f * (w + s * dm), 0.0)
    return s * f, w


@triton.jit
def exp_terms(z, m_ref, c, BASE2: tl.constexpr):
    """The terms of a new tile of logits z, centred on m_ref: e = e^d and e·d (0 where e = 0,
    instead of 0·(−inf)), with d = centred(z, m_ref)·c."""
    d = centred(z, m_ref) * c
    e = _exp(d, BASE2)
    return e, e * tl.where(e > 0, d, 0.0)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (the interpreter), small so that
    the split paths of the launch plans are exercised at test shapes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
