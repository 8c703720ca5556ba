"""Resumable checkpoints of `erm.train_sentence_rm`: safetensors + JSON, nothing pickled.

A checkpoint folder holds `state-STEP.safetensors` (the trainable weights — the value head and
aggregator, the backbone when it trains, or its LoRA adapter —, the optimizer's tensors and the
torch / CUDA random states) and `checkpoint.json` (the step, the history, the optimizer's
hyper-parameters, the scheduler's state, Python's random state, the run's fingerprint, the
safetensors file's name and sha256). Both are written to temporary names and renamed, the JSON
last: the JSON names a complete file, and a crash leaves the previous checkpoint whole. Weights
come from `torch.distributed.checkpoint.state_dict` as full (unsharded) tensors on the CPU, so an
FSDP2 run gathers its shards into the same files one process writes; only rank 0 writes.

    save(folder, fwd, opt, sched, meta, sharded=...)   # every rank (gathering is a collective)
    meta = load(folder, fwd, opt, sched, fingerprint)  # refuses another run, naming what differs
"""
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Dict, Optional

import torch

from . import dp
from .loading import differences, file_digest

__all__ = ["save", "load", "exists", "CheckpointMismatch", "INDEX"]

INDEX = "checkpoint.json"
_FORMAT = "erm-srm-checkpoint"


class CheckpointMismatch(ValueError):
    """A checkpoint written by another run (model, data or configuration)."""


def exists(folder) -> bool:
    """Whether `folder` holds a checkpoint (its checkpoint.json)."""
    return (Path(folder) / INDEX).is_file()


def _options(sharded: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=sharded, strict=False)


def _trainable_names(fwd) -> set:
    return {n for n, p in fwd.named_parameters() if p.requires_grad}


def _flatten_optimizer(osd: dict, tensors: Dict[str, torch.Tensor]) -> dict:
    """Tensors of an optimizer state dict into `tensors` ("optim/PARAM/KEY"); the rest as JSON."""
    plain = {}
    for name, st in osd["state"].items():
        plain[name] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                plain[name][k] = v
    return {"state": plain, "param_groups": osd["param_groups"]}


def _unflatten_optimizer(js: dict, tensors: Dict[str, torch.Tensor]) -> dict:
    state = {name: dict(v) for name, v in js["state"].items()}
    for key, t in tensors.items():
        if key.startswith("optim/"):
            name, k = key[len("optim/"):].rsplit("/", 1)
            state.setdefault(name, {})[k] = t
    return {"state": state, "param_groups": js["param_groups"]}


def _check_finite(tensors: Dict[str, torch.Tensor]) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ValueError(f"refusing to write a checkpoint with non-finite values in "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def _sha256(path: Path) -> str:
    return file_digest(path)


def save(folder, fwd, opt, sched, meta: dict, *, sharded: bool = False) -> Optional[Path]:
    """Write a checkpoint of `fwd` (the unwrapped `SRMForward`; FSDP2 wraps in place),
    optimizer `opt` and LR scheduler `sched`, with `meta` (JSON-serialisable: step, history,
    fingerprint, ...). Every rank calls it when `sharded` (the gather is a collective); rank 0
    writes. Returns the folder on rank 0, None elsewhere.

    Raises:
        ValueError: a weight or optimizer value is not finite (nothing is written).
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    rank = dp.rank_and_size()[0]
    if rank != 0 and not sharded:
        return None
    keep = _trainable_names(fwd)
    model_sd = get_model_state_dict(fwd, options=_options(sharded))
    optim_sd = get_optimizer_state_dict(fwd, opt, options=_options(sharded))
    if rank != 0:
        return None
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model_sd.items()
               if k in keep}
    optim_js = _flatten_optimizer(optim_sd, tensors)
    _check_finite(tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"state-{int(meta['step']):08d}.safetensors"
    tmp = folder / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": _FORMAT})
    os.replace(tmp, folder / name)
    py = random.getstate()
    index = dict(meta, format=_FORMAT, version=1, file=name, sha256=_sha256(folder / name),
                 optimizer=optim_js, scheduler=sched.state_dict(),
                 python_rng=[py[0], list(py[1]), py[2]])
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / INDEX)
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder


def read_index(folder) -> dict:
    """The checkpoint.json of `folder` (FileNotFoundError / ValueError when it is not one)."""
    p = Path(folder) / INDEX
    if not p.is_file():
        raise FileNotFoundError(f"{folder}: no checkpoint ({INDEX}) to resume from")
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != _FORMAT:
        raise ValueError(f"{p}: not a SentenceRM training checkpoint")
    return index


def load(folder, fwd, opt, sched, fingerprint: dict) -> dict:
    """Restore a checkpoint into `fwd`, `opt`, `sched` and the random states (every rank reads
    the files), after checking that it was written by this run. Returns its JSON (step,
    history, ...).

    Raises:
        CheckpointMismatch: another model, data or configuration, naming what differs.
        ValueError: a damaged checkpoint (its tensors' sha256 differs from the one recorded).
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    index = read_index(folder)
    if index.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"--resume: {folder} was written by another run ("
            f"{'; '.join(differences(index.get('fingerprint') or {}, fingerprint))}); start without "
            "--resume or with the same model, data and configuration")
    path = Path(folder) / index["file"]
    if not path.is_file() or _sha256(path) != index["sha256"]:
        raise ValueError(f"{path}: missing or damaged (its sha256 differs from {INDEX}'s)")
    tensors = load_file(str(path))
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing = _trainable_names(fwd) - set(model)
    if missing:
        raise ValueError(f"{path}: no weights for {sorted(missing)[:3]}")
    set_model_state_dict(fwd, model, options=_options(False))
    set_optimizer_state_dict(fwd, opt, _unflatten_optimizer(index["optimizer"], tensors),
                             options=_options(False))
    sched.load_state_dict(index["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = index["python_rng"]
    random.setstate((v, tuple(state), gauss))
    return index


def data_digest(pairs) -> str:
    """sha256 of the pairs' contents (prompt, chosen, rejected), as the fingerprint's data."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected], ensure_ascii=False).encode())
    return h.hexdigest()


def weights_digest(module) -> str:
    """A cheap identity of a model object's weights: names, shapes, dtypes and float64 sums."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.state_dict().items():
            s = float(p.double().sum()) if p.is_floating_point() else int(p.sum())
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{s!r}".encode())
    return h.hexdigest()
