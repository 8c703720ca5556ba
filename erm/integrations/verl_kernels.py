"""erm's fused LM-head statistics behind verl's fused log-prob/entropy path.

verl's actor (`actor_rollout_ref.model.use_fused_kernels=True`) computes per-token log-probs and
entropies from the final hidden states and the LM-head weight without the full logits, through
one of two functions, both returning `(log_probs, entropy)`:

* `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels,
  temperature, reduction, dist_process_group=None)` (the "triton" backend of the HF forwards,
  imported inside the forward; the Megatron forwards import it at module load, with the
  tensor-parallel group and a vocab-parallel weight);
* `verl.utils.experimental.torch_functional.FusedLinearForPPO` (the "torch" backend, a module
  whose forward takes `(hidden_states, vocab_weights, input_ids, temperature)`).

`use_erm_kernels()` points both at `erm.linear_token_stats` (and
`erm.vocab_parallel_linear_token_stats` for a process group): any hidden size (verl's Triton
kernel needs `hidden_size % 128 == 0`), CPU or GPU, and never a log-prob above 0. In verl's
worker processes set `ERM_VERL_KERNELS=1` (e.g. `+ray_kwargs.ray_init.runtime_env.env_vars.
ERM_VERL_KERNELS='"1"'`): erm's verl plugin, which verl imports in every process, then calls
`use_erm_kernels()` itself.
"""
import sys
from typing import Dict, List, Tuple

import torch
from torch import Tensor

__all__ = ["erm_linear_cross_entropy", "ErmFusedLinearForPPO", "use_erm_kernels"]

_REDUCTIONS = ("none", "sum", "mean")
#: verl modules that bind `linear_cross_entropy` at import time (patched when already imported).
_MCORE_MODULES = ("verl.models.mcore.model_forward_fused",
                  "verl.models.mcore.model_forward_1f1b_overlap")
_ORIGINALS: Dict[Tuple[str, str], object] = {}


def erm_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                             temperature: float = 1.0, reduction: str = "none",
                             dist_process_group=None) -> Tuple[Tensor, Tensor]:
    """verl's `linear_cross_entropy`, computed by `erm.linear_token_stats`.

    Args:
        hidden: (..., D) final hidden states (float32 / bfloat16 / float16).
        weight: (V, D) LM-head weight of hidden's dtype; with `dist_process_group`, this rank's
            (V / world, D) rows of a vocabulary split evenly in rank order (Megatron's layout).
        labels: (...) integer ids in [0, V) (global ids with a process group); -100 rows get
            log-prob 0 and no gradient.
        temperature: > 0; the statistics are those of softmax(hidden @ weight.T / temperature).
        reduction: "none" (per-token log-probs), "sum" or "mean" (one scalar log-prob).
        dist_process_group: the tensor-parallel group of a vocab-parallel weight, or None.
    Returns:
        (log_probs, entropy): float32; log_probs (N,) with N = labels.numel() (a 0-dim tensor for
        "sum"/"mean"), entropy (N,); both differentiable w.r.t. hidden and weight.
    Raises:
        ValueError: an unknown reduction (and erm's errors for bad tensors).
    """
    from .. import linear_token_stats, vocab_parallel_linear_token_stats

    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = labels.reshape(-1).long()
    if dist_process_group is None:
        st = linear_token_stats(h, weight, t, temperature=float(temperature), entropy=True)
    else:
        import torch.distributed as dist

        start = dist.get_rank(dist_process_group) * weight.shape[0]
        st = vocab_parallel_linear_token_stats(h, weight, t, vocab_start=start,
                                               group=dist_process_group,
                                               temperature=float(temperature), entropy=True)
    lp = st.logprob.float()
    if reduction == "sum":
        lp = lp.sum()
    elif reduction == "mean":
        lp = lp.mean()
    return lp, st.entropy.float()


class ErmFusedLinearForPPO(torch.nn.Module):
    """verl's `FusedLinearForPPO` computed by `erm.linear_token_stats`.

    Args:
        chunk_size, impl_backend: accepted as verl passes them and not used (erm tiles the
            vocabulary itself; impl_backend must still be "torch" or "liger").
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. "
                             "Choose 'torch' or 'liger'.")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
        """(log_probs, entropy) of `input_ids` under softmax(hidden_states @ vocab_weights.T /
        temperature).

        Args:
            hidden_states: (T, D) or (B, T, D); vocab_weights: (V, D); input_ids: hidden's
                leading shape.
        Returns:
            log_probs float32 and entropy in hidden's dtype, both of input_ids' shape (as verl's
            torch backend returns them).
        """
        if hidden_states.dim() not in (2, 3):
            raise ValueError(f"hidden_states must be 2D or 3D, got shape "
                             f"{tuple(hidden_states.shape)}")
        if tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must match hidden_states "
                             f"shape {tuple(hidden_states.shape[:-1])}")
        lp, ent = erm_linear_cross_entropy(hidden_states, vocab_weights, input_ids, temperature)
        shape = input_ids.shape
        return lp.view(shape), ent.to(hidden_states.dtype).view(shape)


def _swap(module, name: str, value, enable: bool) -> bool:
    key = (module.__name__, name)
    if enable:
        _ORIGINALS.setdefault(key, getattr(module, name))
        setattr(module, name, value)
        return True
    if key in _ORIGINALS:
        setattr(module, name, _ORIGINALS.pop(key))
        return True
    return False


def use_erm_kernels(enable: bool = True) -> List[str]:
    """Make verl's fused log-prob/entropy path compute with erm (`enable=False`: put verl's own
    functions back).

    Patches `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` and
    `verl.utils.experimental.torch_functional.FusedLinearForPPO` (where verl's HF forwards look
    them up when they run), and the `linear_cross_entropy` of verl's Megatron forward modules
    that are already imported (those imported later bind the patched function themselves).
    Call it in every process that runs the actor, before its first forward.

    Returns:
        the dotted names patched (or restored).
    Raises:
        ImportError: verl is not installed.
    """
    import verl.utils.experimental.torch_functional as torch_functional
    import verl.utils.kernel.linear_cross_entropy as lce

    done = []
    targets = [(lce, "linear_cross_entropy", erm_linear_cross_entropy),
               (torch_functional, "FusedLinearForPPO", ErmFusedLinearForPPO)]
    targets += [(sys.modules[m], "linear_cross_entropy", erm_linear_cross_entropy)
                for m in _MCORE_MODULES if m in sys.modules]
    for module, name, value in targets:
        if _swap(module, name, value, enable):
            done.append(f"{module.__name__}.{name}")
    return done

