"""Data-parallel training of a `SentenceRM` (`erm.train_sentence_rm` under torchrun): the model
as one module for DDP / FSDP2, the pairs each rank owns and the batches of every step.

Every rank owns a fixed, contiguous shard of the training pairs (`dp.shard`): with a frozen
backbone it computes and caches the marker states of its own pairs only. An epoch has
ceil(n / batch_size) batches on every rank; batch j of rank r is the j-th of ceil(n / batch_size)
near-equal slices of its pairs in an order shuffled per (seed, epoch, rank), so the global batch
j is the union of the ranks' slices (about batch_size pairs; one process: the slices of all
pairs). The Bradley–Terry loss of a rank's slice is summed and divided by the global number of
pairs of the optimizer step (known to every rank without communication), times the world size
(DDP and FSDP2 average the gradients): one step on N ranks is one step of one process on the
union of the slices. A rank whose slice is empty runs its first pair with weight 0, so that
every rank runs the same forwards and backwards (the collectives of DDP and FSDP2 need it).

    fwd = SRMForward(rm); model = wrap(fwd, "fsdp")        # or "ddp", or None
    model(examples=[...]) -> (B,) rewards; model(states=[...]) from cached marker states
"""
import contextlib
import math
import random
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import dp

__all__ = ["SRMForward", "wrap", "unwrap", "grad_sync", "owned_pairs", "epoch_batches",
           "batch_counts", "balance", "MODES"]

MODES = (None, "ddp", "fsdp")


class SRMForward(nn.Module):
    """A SentenceRM's rewards as one module, so that DDP or FSDP2 wraps the backbone and the head
    together and reduces their gradients in its backward.

    forward(examples=None, states=None, markers=False): the (B,) float32 rewards R of encoded
    examples (one backbone forward, bf16 autocast on CUDA) or of cached (K_b+1, D) marker states;
    `markers=True` returns the list of marker states of the examples instead (for the cache)."""

    def __init__(self, rm):
        super().__init__()
        self.rm = rm

    def forward(self, examples: Optional[Sequence] = None, states: Optional[Sequence] = None,
                markers: bool = False):
        rm = self.rm
        if states is None:
            dev = next(rm.backbone.parameters()).device
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                states = rm.marker_states(examples)
            if markers:
                return [s.float() for s in states]
        return rm.aggregate_states(states)[0]


def wrap(fwd: SRMForward, mode: Optional[str]):
    """`fwd` for data-parallel training: None (as is), "ddp" (replicated; the trainable
    parameters broadcast from rank 0) or "fsdp" (FSDP2: every block of the backbone's layer
    lists its own shard group, the value head, aggregator, embeddings and final norm in the
    root group; `fwd`'s parameters become this rank's shards in place: build the optimizer
    after wrapping)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode is None:
        return fwd
    if mode == "ddp":
        dev = next(fwd.parameters()).device
        return nn.parallel.DistributedDataParallel(
            fwd, device_ids=[dev.index] if dev.type == "cuda" else None,
            broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    dp.check_fsdp_device(fwd)
    for mod in fwd.rm.backbone.modules():
        if isinstance(mod, nn.ModuleList):
            for block in mod:
                fully_shard(block)
    fully_shard(fwd)
    return fwd


def unwrap(model) -> SRMForward:
    """The `SRMForward` inside a `wrap` result (FSDP2 wraps in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model) -> bool:
    """Whether `model` is FSDP2-sharded (`wrap(..., "fsdp")`)."""
    return hasattr(model, "set_requires_gradient_sync")


def grad_sync(model, sync: bool):
    """A context in which backward reduces the gradients over the ranks, or (sync False) only
    accumulates them (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def owned_pairs(n: int, rank: int, size: int) -> range:
    """The training pairs rank `rank` of `size` owns (and caches): a contiguous shard of n."""
    if n < size:
        raise ValueError(f"{n} training pairs cannot be shared by {size} ranks: every rank "
                         "needs at least one")
    return dp.shard(n, rank, size)


def epoch_batches(owned: Sequence[int], n_batches: int, seed: int, epoch: int,
                  rank: int) -> List[List[int]]:
    """This rank's slice of each of the epoch's `n_batches` batches: its pairs shuffled per
    (seed, epoch, rank), cut in n_batches near-equal slices (some empty when it owns fewer)."""
    order = list(owned)
    random.Random(f"{seed}/{epoch}/{rank}").shuffle(order)
    return [[order[i] for i in dp.shard(len(order), j, n_batches)] for j in range(n_batches)]


def batch_counts(n: int, size: int, n_batches: int) -> List[int]:
    """Pairs in each global batch (all ranks' slices together), computed on every rank."""
    owned = [len(dp.shard(n, r, size)) for r in range(size)]
    return [sum(len(dp.shard(k, j, n_batches)) for k in owned) for j in range(n_batches)]


def n_batches(n: int, batch_size: int) -> int:
    """Batches per epoch: ceil(n / batch_size)."""
    return max(1, math.ceil(n / batch_size))


def balance(batches: List[list], sharded: bool) -> List[Optional[list]]:
    """`batches` padded with None (a forward whose result is dropped) to the most batches any
    rank has, when the model is FSDP2-sharded (each of its forwards is a collective)."""
    if not sharded:
        return list(batches)
    most = int(max(dp.gather_objects(len(batches))))
    return list(batches) + [None] * (most - len(batches))


def finite_norm(params: Sequence[Tensor], clip: Optional[float]) -> float:
    """The global gradient norm of `params` (DTensor shards included), clipped to `clip` when
    it is given; float("nan") / inf when a gradient is not finite."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, math.inf if clip is None else clip)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
