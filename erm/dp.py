"""Data parallelism: the torchrun process group, resumable data-parallel scoring (`erm score`
under `torchrun`, and across crashes) and the DDP / FSDP2 wrappers of the RL policy (`erm rl`).

    torchrun --nproc-per-node 4 -m erm score --data in.jsonl --out out.jsonl [--resume]

Under torchrun (WORLD_SIZE > 1) each rank scores a contiguous shard of the input rows (length-
sorted batching stays inside the rank) with its own copy of the model (GPU `LOCAL_RANK`, or the
CPU). Every rank appends its results, a line {"index": i, "value": r} per row, to its own part
file beside the output (`OUT.part-R`), flushed after each chunk. A part file starts with a header
line holding the run's fingerprint (model, reduction, system prompt, alpha, max length, field,
the input's sha256, ...): `--resume` reuses only parts written under the same fingerprint and
refuses others, naming what differs. At the end the scored rows travel to rank 0 through the
process group (`gather_rows`, no shared file system needed) and rank 0 writes the output in
input order in one rename; a single process does the same with one part. A crash therefore loses
at most one chunk per rank: `--resume` reads every part file each rank can see (from any number
of ranks; without a shared file system a node sees the parts its own ranks wrote, so resume on
the same nodes or copy the parts), the ranks pool what they read, score only the rows missing
and then merge. Rank 0 shows a progress bar read from the part files it sees.

Training (`erm.rl.Trainer` under torchrun): `wrap_ddp` replicates the policy, `wrap_fsdp` shards
it with FSDP2; both wrap `PolicyStats`, the policy's response statistics as one module, so the
wrapper's backward reduces the gradients. `grad_sync` turns that reduction off between
micro-batches and `all_sum` sums the metrics over the ranks; `erm.checkpoint` keeps full
(unsharded) checkpoints of training, written by rank 0.

Two views of the ranks: `torchrun_env` reads what torchrun put in the environment (before a
process group exists); `rank_and_size` asks the process group that was joined.
"""
import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import lm
from .loading import differences


def torchrun_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment variables RANK, WORLD_SIZE,
    LOCAL_RANK ((0, 1, 0) without them), whether or not a process group was joined."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_RANK", 0)))


def rank_and_size() -> Tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(device=None) -> tuple:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1.

    Returns (rank, world size, device to load the model on: `device`, else cuda:LOCAL_RANK when
    a GPU is visible, else None)."""
    import torch.distributed as dist

    rank, size, local = torchrun_env()
    if device is None and torch.cuda.is_available() and size > 1:
        device = f"cuda:{local}"
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if str(device or "").startswith("cuda") else "gloo")
    if size > 1 and str(device or "").startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # the device of NCCL's object collectives
    return rank, size, device


def barrier() -> None:
    """Wait for every rank of the process group (nothing without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(sync: bool = True) -> None:
    """Leave the process group, if one was joined, after a last barrier (`sync`, when every
    rank got here)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def exit_if_joined(code: int, sync: bool = True) -> None:
    """For a command-line entry point under torchrun: when a process group was joined, meet the
    other ranks at a last barrier (`sync`), flush the output and end the process with `code`
    at once. Left to the interpreter's exit, gloo's threads abort a rank now and then while they
    are torn down, after the work is done and written. Returns (does nothing) otherwise."""
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if sync:
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard(n: int, rank: int, size: int) -> range:
    """The contiguous rows [start, stop) of `rank` among `size` ranks (sizes differ by ≤ 1)."""
    return range(n * rank // size, n * (rank + 1) // size)


def part_path(out, rank: int) -> Path:
    """The part file `rank` appends its scored rows to: OUT.part-RANK beside the output."""
    return Path(f"{out}.part-{rank}")


def parts(out) -> List[Path]:
    """Every part file of `out` present, from any number of ranks: the files named exactly
    OUT.part-RANK (RANK a number) beside it; the name is never a pattern, so `r[12].jsonl` or
    `*.jsonl` match only their own parts."""
    out = Path(out)
    folder, stem = out.parent, out.name + ".part-"
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(folder / f for f in names
                  if f.startswith(stem) and f[len(stem):].isdigit() and f[len(stem):].isascii())


class PartsMismatch(ValueError):
    """A part file written by a run whose fingerprint differs from this one's."""


def _header(line: str):
    """The fingerprint of a part file's first line, or None when it is not a header."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get("fingerprint") if isinstance(rec, dict) and "erm_part" in rec else None


def read_parts(out, n: int, fingerprint: Optional[dict] = None) -> Dict[int, float]:
    """{row index: value} from the part files of `out`; a torn last line (a crash mid-write) and
    indices outside [0, n) are ignored. With `fingerprint`, a part file whose header records
    another one (another model, reduction, input, ...) or none raises `PartsMismatch` naming
    what differs; an empty part file is skipped."""
    done = {}
    for p in parts(out):
        lines = p.read_text(encoding="utf-8").splitlines()
        if not lines:
            continue
        theirs = _header(lines[0])
        if fingerprint is not None and theirs != fingerprint:
            why = ("it has no run header (written by an older erm)" if theirs is None else
                   "it was written by another run (" + "; ".join(differences(theirs, fingerprint)) + ")")
            raise PartsMismatch(f"--resume: {p}: {why}; its values cannot be reused: run "
                                "without --resume to start over")
        for line in lines[theirs is not None:]:
            try:
                rec = json.loads(line)
                i, v = int(rec["index"]), float(rec["value"])
            except (ValueError, KeyError, TypeError):
                continue
            if 0 <= i < n:
                done[i] = v
    return done


def score_rows(todo: Sequence[int], score: Callable[[List[int]], Sequence[float]], out, rank: int,
               *, total: int, done: int, chunk: int, progress: bool,
               fingerprint: Optional[dict] = None) -> Dict[int, float]:
    """Score the rows `todo` in chunks with `score(indices) -> values`, appending each chunk to
    this rank's part file as soon as it is scored (a new part file starts with a header line
    holding `fingerprint`). Rank 0 shows the progress (rows in the part files it sees) out of
    `total`, starting from `done`. Returns {row index: value} of the rows scored."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc="scoring", unit="row",
               disable=not progress or rank != 0, leave=False)
    counted = {}  # part file -> (bytes read, lines in them): each file is read once, as it grows
    got = {}
    path = part_path(out, rank)
    with open(path, "a", encoding="utf-8") as f, bar:
        if f.tell() == 0:
            f.write(json.dumps({"erm_part": 1, "fingerprint": fingerprint}, allow_nan=False)
                    + "\n")
            f.flush()
        for k in range(0, len(todo), chunk):
            idx = list(todo[k:k + chunk])
            values = [float(v) for v in score(idx)]
            f.write("".join(json.dumps({"index": i, "value": v}, allow_nan=False) + "\n"
                            for i, v in zip(idx, values)))
            f.flush()
            os.fsync(f.fileno())
            got.update(zip(idx, values))
            if rank == 0 and not bar.disable:
                seen = parts(out)
                bar.n = min(total, _count_lines(seen, counted) - len(seen))  # less the headers
                bar.refresh()
    return got


def gather_rows(rows: Dict[int, float], *, everyone: bool = False,
                chunk: int = 1 << 16) -> Optional[Dict[int, float]]:
    """The union of every rank's `rows` ({row index: value}), sent through the process group
    (no shared file system needed) in rounds of at most `chunk` rows per rank: on rank 0 (on
    every rank with `everyone`); None on the other ranks. Without a process group: `rows`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(rows)
    rank, size = dist.get_rank(), dist.get_world_size()
    items = sorted(rows.items())
    sizes = [None] * size
    dist.all_gather_object(sizes, len(items))
    out = {} if everyone or rank == 0 else None
    for k in range(0, max(sizes), chunk):
        piece = items[k:k + chunk]
        got = [None] * size
        if everyone:
            dist.all_gather_object(got, piece)
        else:
            dist.gather_object(piece, got if rank == 0 else None, dst=0)
        if out is not None:
            for part in got:
                out.update(part)
    return out


def gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (one all_gather_object); [obj] without a
    process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got


def all_sum(values: Sequence[float], device) -> List[float]:
    """Element-wise SUM over the ranks of a list of floats (or 0-dim tensors), reduced as one
    float64 tensor on `device` (the process group's device); the values themselves, as floats,
    without a process group of more than one rank."""
    import torch.distributed as dist

    if rank_and_size()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def agree(error: Optional[str]) -> Optional[str]:
    """The first rank's error message (None when no rank has one), on every rank: ranks that
    must stop together, when one of them cannot go on, do so instead of waiting on the others
    in a later collective. Without a process group: `error`."""
    return next((e for e in gather_objects(error) if e is not None), None)


def gather_or_raise(obj, error: Optional[str], exc_type=ValueError) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (one all_gather_object); when a rank has
    an `error` message, every rank raises `exc_type` with the first rank's one instead.
    Without a process group: [obj], or the raise."""
    parts = gather_objects((error, obj))
    first = next((e for e, _ in parts if e is not None), None)
    if first is not None:
        raise exc_type(first)
    return [o for _, o in parts]


def _count_lines(paths, counted: dict) -> int:
    """Lines in `paths`, reading only what each file gained since the last call."""
    for p in paths:
        seen, n = counted.get(p, (0, 0))
        with open(p, "rb") as fh:
            fh.seek(seen)
            new = fh.read()
        counted[p] = (seen + len(new), n + new.count(b"\n"))
    return sum(n for _, n in counted.values())


def remove_parts(out) -> None:
    """Delete every part file of `out` (after the merged output is written)."""
    for p in parts(out):
        p.unlink(missing_ok=True)


# ------------------------------------------------------------------ the RL policy's wrappers
class PolicyStats(torch.nn.Module):
    """The policy's response statistics as one module, so that DDP or FSDP wraps the whole
    forward (the model body and the fused head) and reduces the policy's gradients in its
    backward. Under FSDP, `generate` is a forward method too (its parameters are gathered).

    forward(input_ids (B, T) int64, attention_mask (B, T), start: int, targets (B, R) int64,
    *, alpha, entropy, compute_dtype) -> `erm.lm.window_token_stats` of the policy, each
    (B, R) tensor a fresh one (not a view)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, start, targets, *, alpha, entropy,
                compute_dtype=None):
        st = lm.window_token_stats(self.policy, input_ids, attention_mask, start, targets,
                                   alpha=alpha, entropy=entropy, compute_dtype=compute_dtype)
        # (B, R) outputs of their own, not views: the wrapper hooks its backward onto them
        return type(st)(*(t if t is None or t._base is None else t.clone() for t in st))

    def generate(self, **kw):
        """`policy.generate` in step with the other ranks (`synced_gpus`: every rank runs the
        same number of decoding steps, as the all-gathers of a sharded policy need)."""
        return self.policy.generate(**kw, synced_gpus=rank_and_size()[1] > 1)


def is_ddp(module) -> bool:
    """Whether `module` is a DistributedDataParallel wrapper (`wrap_ddp`)."""
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def is_fsdp(module) -> bool:
    """Whether `module` is the FSDP2 root of the policy (`wrap_fsdp`)."""
    return isinstance(module, PolicyStats) and hasattr(module, "set_requires_gradient_sync")


def is_data_parallel(module) -> bool:
    """A DDP or FSDP wrapper of the policy (`wrap_ddp`, `wrap_fsdp`): calling it gives the
    policy's statistics (`PolicyStats`) and its backward reduces the gradients."""
    return is_ddp(module) or is_fsdp(module)


def wrap_ddp(policy):
    """DDP over `PolicyStats(policy)` (the policy's parameters, broadcast from rank 0)."""
    dev = next(policy.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        PolicyStats(policy), device_ids=[dev.index] if dev.type == "cuda" else None)


def _fsdp_api():
    try:  # public from torch 2.6 on
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError:  # pragma: no cover - older layouts
        from torch.distributed._composable.fsdp import fully_shard, register_fsdp_forward_method
    return fully_shard, register_fsdp_forward_method


def fsdp_on_cpu() -> bool:
    """Whether this torch's FSDP2 runs on CPU tensors (it needs CPU stream events; torch 2.6's
    has none)."""
    return hasattr(torch.cpu.current_stream(), "record_event")


def check_fsdp_device(module) -> None:
    """A RuntimeError when `module` sits on the CPU and this torch's FSDP2 cannot run there
    (`fsdp_on_cpu`), saying what to use instead."""
    if next(module.parameters()).device.type == "cpu" and not fsdp_on_cpu():
        raise RuntimeError(f"torch {torch.__version__}'s FSDP2 cannot run on the CPU: use a "
                           "GPU, DDP (no --fsdp), or a newer torch")


def wrap_fsdp(policy):
    """FSDP2 over `PolicyStats(policy)`: every block of the model's layer lists (the decoder
    layers) is its own shard group, the root holds the rest (embeddings, final norm and LM head,
    tied or not). `policy`'s parameters become this rank's shards (DTensors) in place, so build
    the optimizer after wrapping; `.generate` of the wrapper samples with the gathered weights."""
    fully_shard, register_fsdp_forward_method = _fsdp_api()
    check_fsdp_device(policy)
    stats = PolicyStats(policy)
    for mod in policy.modules():
        if isinstance(mod, torch.nn.ModuleList):
            for block in mod:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    fully_shard(stats)
    register_fsdp_forward_method(stats, "generate")
    return stats


def grad_sync(policy, sync: bool):
    """A context in which backward reduces the gradients over the ranks or (sync False) only
    accumulates them: DDP's `no_sync`, FSDP's `set_requires_gradient_sync`; a no-op context for
    a policy that is not wrapped."""
    if is_fsdp(policy):
        policy.set_requires_gradient_sync(sync)
    elif is_ddp(policy) and not sync:
        return policy.no_sync()
    return contextlib.nullcontext()
