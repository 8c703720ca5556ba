"""Input validation shared by the ops: every check raises before any kernel launches."""
import math
import numbers

import torch

from .constants import MIN_TEMPERATURE

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKEND_NAMES = ("auto", "cuda", "triton", "torch")
_INT64 = (-(2**63), 2**63 - 1)


def _real(x, name) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def check_alpha(alpha, name="temperature") -> float:
    """α as a float: finite, > 0 and at least `erm.constants.MIN_TEMPERATURE`."""
    a = _real(alpha, name)
    if not (math.isfinite(a) and a >= MIN_TEMPERATURE):
        raise ValueError(f"{name} must be a finite number > 0 (at least erm.constants."
                         f"MIN_TEMPERATURE = {MIN_TEMPERATURE:g}), got {alpha}")
    return a


def check_int(x, name: str, low: int) -> int:
    """`x` itself when it is an int (not a bool) >= `low`; else a ValueError naming `name`."""
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise ValueError(f"{name} must be an int >= {low}, got {x!r}")
    return x


def check_reduction(reduction) -> str:
    """`reduction` itself when it is "sum" or "mean" (how token rewards become one response
    reward); else a ValueError naming it."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return reduction


def check_gamma(gamma) -> float:
    g = _real(gamma, "gamma")
    if not math.isfinite(g):
        raise ValueError(f"gamma must be a finite number, got {gamma}")
    return g


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} "
                        f"({ignore_index!r})")
    i = int(ignore_index)
    if not _INT64[0] <= i <= _INT64[1]:
        raise ValueError(f"ignore_index must fit in int64, got {i}")
    return i


def check_flag(value, name) -> bool:
    if not (isinstance(value, bool) or type(value).__name__ == "bool_"):  # NumPy bools too
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def check_logits(logits, name="logits"):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 (or float64), got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape (..., V), got a scalar")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(logits.shape)}")


def check_targets(targets, lead_shape, device, name="targets") -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {targets.dtype}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have the leading shape of logits {tuple(lead_shape)}, "
                         f"got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{name} is on {targets.device} but logits are on {device}")
    return targets.long()


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index):
    """Raise ValueError if any target outside [0, vocab) is not `ignore_index` (one device sync).
    ignore_index None: every target must lie in [0, vocab) — the targets are then the input ids
    of the reward functions, shifted by one position, and the error names them so."""
    bad = (targets < 0) | (targets >= vocab)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        if ignore_index is None:
            raise ValueError(f"input_ids contain {int(bad.sum())} id(s) outside [0, {vocab}) "
                             f"(first: {first})")
        raise ValueError(f"targets contain {int(bad.sum())} id(s) outside [0, {vocab}) that are "
                         f"not ignore_index={ignore_index} (first: {first})")


def as_bool_tensor(x, shape, name, device) -> torch.Tensor:
    """`x` (a tensor, nested list / tuple or NumPy array of bools, or 0/1 integers) as a bool
    tensor of exactly `shape` on `device`."""
    if isinstance(x, (bool, numbers.Number, str, bytes)) or x is None:
        raise TypeError(f"{name} must be a bool array of shape {tuple(shape)}, got "
                        f"{type(x).__name__}")
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a bool array of shape {tuple(shape)}: {exc}") from None
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"{name} must hold bools (or 0/1 integers), got {t.dtype}")
        if bool(((t != 0) & (t != 1)).any()):
            raise ValueError(f"{name} must hold bools (or 0/1 integers)")
        t = t != 0
    return t.to(device)


def as_terminated(terminated, b: int, device) -> torch.Tensor:
    """`terminated` (one bool for every row, or B per-row bools) as a (B,) bool tensor."""
    if isinstance(terminated, bool) or (hasattr(terminated, "dtype") and getattr(
            terminated, "shape", None) == () and str(terminated.dtype).endswith("bool")):
        return torch.full((b,), bool(terminated), dtype=torch.bool, device=device)
    return as_bool_tensor(terminated, (b,), "terminated", device)
