"""How the kernels address the rows of logits (..., V) without copying them."""
from torch import Tensor


def row_layout(logits: Tensor):
    """(logits', inner_rows, stride_outer, stride_inner): row r of logits' starts at element
    (r // inner_rows)·stride_outer + (r % inner_rows)·stride_inner. No copy when the leading dims
    collapse to one row stride, or for (B, T, V) views such as `logits[:, :-1]`; otherwise (or when
    the last stride is not 1) a contiguous copy."""
    v = logits.shape[-1]
    if v > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    try:
        rows = logits.view(-1, v)
        return logits, max(rows.shape[0], 1), 0, rows.stride(0)
    except RuntimeError:
        pass
    if logits.dim() == 3:  # e.g. logits[:, :-1] of a (B, T, V) tensor
        return logits, logits.shape[1], logits.stride(0), logits.stride(1)
    logits = logits.contiguous()
    return logits, max(logits.numel() // v, 1), 0, v
