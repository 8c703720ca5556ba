"""Training checkpoints of `erm rl` that hold no code: tensors in a torch file read back with
`torch.load(weights_only=True)` (no pickled object is ever constructed), everything else in
JSON beside it.

    OUT/checkpoint.json        {"format", "step", "config", "model", "rng", "tensors"}
    OUT/checkpoint-STEP.pt     {"step": int, "policy": {name: tensor}, "optimizer": state dict}

`checkpoint.json` is the commit point: a save writes the tensor file under a new name, then
replaces the JSON in one rename, then deletes the tensor file the JSON named before, so a crash
at any moment leaves the last good checkpoint whole. A checkpoint is never written with a
non-finite tensor (`CheckpointError` instead: the last good one stays). Full (unsharded) states:
under FSDP2 every rank takes part in gathering the shards and rank 0 writes.

`read_meta` reads and checks the JSON, `erm.loading.differences` compares its config and model
fingerprint with a new run's, `load` restores the tensors and the random states. Every failure to
read (a truncated or garbage file, a pickle that would run code, tensors of another model) is a
`CheckpointError`, a ValueError whose message names the file.
"""
import base64
import json
import os
import random
import re
from pathlib import Path
from typing import List, Optional

import torch

from . import dp

FORMAT = 1
META = "checkpoint.json"
_TENSORS = re.compile(r"checkpoint-\d+\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read or resumed; the message names the file."""


# ------------------------------------------------------------------ random states as JSON
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's torch (CPU, every CUDA device) and Python random states, JSON-ready:
    {"torch": base64 str, "cuda": [base64 str] or None, "python": [version, [int]*625, gauss]}."""
    version, state, gauss = random.getstate()
    return {"torch": _b64(torch.get_rng_state()),
            "cuda": ([_b64(s) for s in torch.cuda.get_rng_state_all()]
                     if torch.cuda.is_available() else None),
            "python": [version, list(state), gauss]}


def set_rng_state(rng: dict) -> None:
    """Restore what `rng_state` returned (the CUDA states only where CUDA is available)."""
    torch.set_rng_state(_bytes_tensor(rng["torch"]))
    version, state, gauss = rng["python"]
    random.setstate((int(version), tuple(int(x) for x in state), gauss))
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in rng["cuda"]])


# ------------------------------------------------------------------ identities and checks
def tensors_fingerprint(model) -> dict:
    """{"sha256": hex} over the names, dtypes, shapes and bytes of `model`'s state dict (full
    tensors: not for a sharded model): the identity of a model built in memory."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"sha256": h.hexdigest()}


def _local(t):
    """A tensor's values on this rank (an FSDP2 shard's local part)."""
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_tensors(model, optimizer) -> List[str]:
    """Names of `model`'s parameters and buffers and `optimizer`'s state tensors holding a NaN or
    an infinity, in this rank's part (its shards under FSDP2)."""
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(_local(t.detach())).all())]
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        bad += [f"optimizer {k} of {names.get(id(p), '?')}" for k, v in st.items()
                if torch.is_tensor(v) and v.is_floating_point()
                and not bool(torch.isfinite(_local(v)).all())]
    return bad


# ------------------------------------------------------------------ write
def _write_atomic(path: Path, write) -> None:
    """`write(tmp_path)`, fsync, then rename onto `path` (a crash leaves `path` as it was)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(folder, model, optimizer, meta: dict, *, sharded: bool = False) -> Path:
    """Write a checkpoint into `folder` (see the module docstring) on rank 0; returns the path
    of its `checkpoint.json`.

    Args:
        model, optimizer: the policy (plain, the module inside DDP, or FSDP2-sharded) and its
            optimizer; their full state dicts are written.
        meta: JSON-serialisable, with an int "step" (also the config, the model fingerprint).
        sharded: an FSDP2 model: every rank must call `save` (gathering the shards and agreeing
            on the finite check are collectives). Otherwise rank 0 alone writes; every rank
            that calls it checks its own replica.
    Raises:
        CheckpointError: a parameter, buffer or optimizer state holds NaN or ±inf (on every
            rank); nothing is written and the last checkpoint stays.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    folder, rank = Path(folder), dp.rank_and_size()[0]
    bad = nonfinite_tensors(model, optimizer)
    err = (f"refusing to write a checkpoint at step {meta['step']}: non-finite values in "
           f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; {folder / META} keeps the "
           "last good one") if bad else None
    err = dp.agree(err) if sharded else err
    if err:
        raise CheckpointError(err)
    if rank != 0 and not sharded:
        return folder / META
    full = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    state = {"step": int(meta["step"]), "policy": get_model_state_dict(model, options=full),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=full)}
    if rank != 0:
        return folder / META
    name = f"checkpoint-{int(meta['step'])}.pt"
    try:
        old = read_meta(folder, strict=False)
    except CheckpointError:
        old = None
    _write_atomic(folder / name, lambda p: torch.save(state, p))
    text = json.dumps(dict(meta, format=FORMAT, tensors=name, rng=rng_state()), indent=1)
    _write_atomic(folder / META, lambda p: p.write_text(text, encoding="utf-8"))
    if old is not None and old.get("tensors") not in (None, name):
        (folder / old["tensors"]).unlink(missing_ok=True)
    return folder / META


# ------------------------------------------------------------------ read
def read_meta(folder, *, strict: bool = True) -> Optional[dict]:
    """The checked `checkpoint.json` of `folder`, None when there is none.

    Raises:
        CheckpointError: the JSON is unreadable, of another format, names no tensor file of
            its own or (`strict`) that file is missing; or only a `checkpoint.pt` of an older
            erm is there (a pickle, never loaded)."""
    folder = Path(folder)
    path = folder / META
    if not path.exists():
        if strict and (folder / "checkpoint.pt").exists():
            raise CheckpointError(f"{folder / 'checkpoint.pt'}: a checkpoint of an older erm "
                                  "(a pickle, which erm no longer loads): start over without "
                                  "--resume")
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a checkpoint erm wrote (not JSON: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: not a checkpoint erm can read (format {got!r}, "
                              f"expected {FORMAT})")
    missing = [k for k in ("step", "config", "rng", "tensors") if k not in meta]
    if missing or not isinstance(meta["step"], int) or not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: a damaged checkpoint (missing or bad {missing or 'step'})")
    if not isinstance(meta["tensors"], str) or not _TENSORS.fullmatch(meta["tensors"]):
        raise CheckpointError(f"{path}: bad tensor file name {meta['tensors']!r}")
    if strict and not (folder / meta["tensors"]).is_file():
        raise CheckpointError(f"{path}: its tensor file {folder / meta['tensors']} is missing")
    return meta


def load(folder, meta: dict, model, optimizer, *, device=None, sharded: bool = False) -> None:
    """Restore the checkpoint `meta` (from `read_meta`) of `folder` into `model` (plain, DDP's
    module or FSDP2-sharded) and `optimizer`, and the random states (rank 0's at the save).
    The tensors load onto `device` (the CPU when `sharded`) with `weights_only=True`.

    Raises:
        CheckpointError: the tensor file is truncated, garbage, holds anything but tensors and
            plain containers, belongs to another step, or does not fit the model / optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    path = Path(folder) / meta["tensors"]
    try:
        ck = torch.load(path, map_location="cpu" if sharded else device, weights_only=True)
    except Exception as exc:  # zip, pickle, storage errors: all mean "not a checkpoint"
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a checkpoint erm can load ({type(exc).__name__}"
                              f"{': ' + why if why else ''})") from None
    if not isinstance(ck, dict) or ck.get("step") != meta["step"] or not {
            "policy", "optimizer"} <= set(ck):
        raise CheckpointError(f"{path}: does not hold step {meta['step']}'s policy and "
                              f"optimizer that {Path(folder) / META} names")
    full = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, ck["policy"], options=full)
        set_optimizer_state_dict(model, optimizer, ck["optimizer"], options=full)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: its tensors do not fit this model ({why})") from None
    try:
        set_rng_state(meta["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{Path(folder) / META}: bad random states ({exc})") from None
