"""Data-parallel, resumable scoring: `erm score` under `torchrun`, and across crashes.

    torchrun --nproc-per-node 4 -m erm score --data in.jsonl --out out.jsonl [--resume]

Under torchrun (WORLD_SIZE > 1) each rank scores a contiguous shard of the input rows (length-
sorted batching stays inside the rank) with its own copy of the model (GPU `LOCAL_RANK`, or the
CPU). Every rank appends its results, a line {"index": i, "value": r} per row, to its own part
file beside the output (`OUT.part-R`), flushed after each chunk. At the end the ranks meet at one
barrier — the only communication — and rank 0 merges the part files in input order and writes
the output in one rename; a single process does the same with one part. A crash therefore loses at
most one chunk per rank: `--resume` reads every part file present (from any number of ranks),
scores only the rows missing and then merges. Rank 0 shows a progress bar of the global progress,
read from the part files.
"""
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch


def world() -> tuple:
    """(rank, world size, local rank) from the torchrun environment ((0, 1, 0) without it)."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_RANK", 0)))


def init(device=None) -> tuple:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1.

    Returns (rank, world size, device to load the model on: `device`, else cuda:LOCAL_RANK when
    a GPU is visible, else None)."""
    import torch.distributed as dist

    rank, size, local = world()
    if device is None and torch.cuda.is_available() and size > 1:
        device = f"cuda:{local}"
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if str(device or "").startswith("cuda") else "gloo")
    return rank, size, device


def barrier() -> None:
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
    return Path(f"{out}.part-{rank}")


def parts(out) -> List[Path]:
    """Every part file of `out` present, from any number of ranks."""
    out = Path(out)
    return sorted(out.parent.glob(out.name + ".part-*"))


def read_parts(out, n: int) -> Dict[int, float]:
    """{row index: value} from the part files of `out`; a torn last line (a crash mid-write) and
    indices outside [0, n) (another input) are ignored."""
    done = {}
    for p in parts(out):
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                i, v = int(rec["index"]), float(rec["value"])
            except (ValueError, KeyError, TypeError):
                continue
            if 0 <= i < n:
                done[i] = v
    return done


def score_rows(todo: Sequence[int], score: Callable[[List[int]], Sequence[float]], out, rank: int,
               *, total: int, done: int, chunk: int, progress: bool) -> None:
    """Score the rows `todo` in chunks with `score(indices) -> values`, appending each chunk to
    this rank's part file as soon as it is scored. Rank 0 shows the global progress (rows in all
    part files) out of `total`, starting from `done`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc="scoring", unit="row",
               disable=not progress or rank != 0, leave=False)
    counted = {}  # part file -> (bytes read, lines in them): each file is read once, as it grows
    with open(part_path(out, rank), "a", encoding="utf-8") as f, bar:
        for k in range(0, len(todo), chunk):
            idx = list(todo[k:k + chunk])
            values = score(idx)
            f.write("".join(json.dumps({"index": i, "value": float(v)}) + "\n"
                            for i, v in zip(idx, values)))
            f.flush()
            os.fsync(f.fileno())
            if rank == 0 and not bar.disable:
                bar.n = min(total, _count_lines(parts(out), counted))
                bar.refresh()


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
    for p in parts(out):
        p.unlink(missing_ok=True)
