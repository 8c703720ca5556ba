"""Input validation shared by the ops: every check raises before any kernel launches."""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_alpha(alpha, name="temperature") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not alpha > 0 or alpha == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {alpha}")
    return alpha


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


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int, name="targets"):
    """Raise ValueError if any target outside [0, vocab) is not ignore_index (one device sync)."""
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(f"{name} contains {int(bad.sum())} id(s) outside [0, {vocab}) that are not "
                         f"ignore_index={ignore_index} (first: {first})")
