"""The files of a saved `erm.SentenceRM`, read and written without pickle (JSON and safetensors
only), every field and tensor checked on the way in.

A saved directory holds

    sentence_rm.json     the config: {"format": "erm-sentence-rm", "version": 2, "aggregate",
                         "attn_dim", "rope", "rope_base", "hidden_size", "system_prompt",
                         "batch_size", "max_length", "backbone", "backbone_saved", "base_model",
                         "base_model_named", "backbone_tuned", "base_model_fingerprint",
                         "adapter"}
    head.safetensors     the value head and the attention aggregator (float32)
    backbone/            the backbone, when it was trained or given as an object
    adapter/             LoRA adapters of a named base ("adapter": "adapter"; `erm.srm_lora`)

Version 2 adds "base_model_fingerprint": `erm.loading.weights_fingerprint` of the named base
model when the SentenceRM was saved, so a head is not silently put on other weights found at
the same path (`check_backbone`). Version 1 directories (no fingerprint) still load.

    cfg = read_config("srm")                 # dict, every field checked (ValueError naming it)
    state = read_head("srm", cfg)            # {name: float32 tensor}, finite
    check_backbone("srm", cfg)               # ValueError naming what differs, if anything
    write_dir("srm", cfg, state)             # head and config, each written atomically
"""
import json
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from torch import Tensor

from .loading import weights_fingerprint

__all__ = ["CONFIG_NAME", "HEAD_NAME", "BACKBONE_DIR", "FORMAT", "VERSION", "VERSIONS",
           "AGGREGATES", "check_config", "read_config", "read_head", "write_dir",
           "is_sentence_rm_dir", "check_backbone", "fingerprint_changes"]

#: Files of a saved SentenceRM directory.
CONFIG_NAME = "sentence_rm.json"
HEAD_NAME = "head.safetensors"
BACKBONE_DIR = "backbone"
FORMAT = "erm-sentence-rm"
#: The format version `write_dir` writes, and every version `read_config` reads.
VERSION = 2
VERSIONS = (1, 2)
#: How a SentenceRM aggregates its sentence rewards (`erm.sentence_rm`).
AGGREGATES = ("attention", "sum", "last")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key(s) {dup}")
    return dict(pairs)


def _is_int(x, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _field_problem(key: str, value) -> Optional[str]:
    """Why `value` is not a valid `key` of a config, or None."""
    if key == "aggregate":
        return None if value in AGGREGATES else f"one of {AGGREGATES}"
    if key == "attn_dim":
        return None if _is_int(value, 2) and value % 2 == 0 else "an even int >= 2"
    if key in ("batch_size", "hidden_size"):
        return None if _is_int(value, 1) else "an int >= 1"
    if key == "max_length":
        return None if _is_int(value, 2) else "an int >= 2"
    if key == "rope_base":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return None if ok and math.isfinite(value) and value > 0 else "a finite number > 0"
    if key in ("rope", "backbone_saved", "base_model_named", "backbone_tuned"):
        return None if isinstance(value, bool) else "true or false"
    if key in ("system_prompt", "backbone", "base_model"):
        return None if value is None or isinstance(value, str) else "a string or null"
    if key == "base_model_fingerprint":
        ok = value is None or (isinstance(value, dict) and isinstance(value.get("files"),
                                                                       (dict, type(None))))
        return None if ok else "null or a weights fingerprint (an object with \"files\")"
    if key == "adapter":
        return None if value in (None, "adapter") else 'null or "adapter" (the adapter folder)'
    return None


_REQUIRED = ("aggregate", "attn_dim", "rope", "rope_base", "backbone")
_OPTIONAL = ("hidden_size", "system_prompt", "batch_size", "max_length", "backbone_saved",
             "base_model", "base_model_named", "backbone_tuned", "base_model_fingerprint",
             "adapter")


def check_config(cfg, where) -> dict:
    """`cfg` (a parsed config) when its format, version and every field are valid, else a
    ValueError naming `where` (the file), the field and what it must be."""
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{where}: not a SentenceRM config (format {FORMAT!r} expected)")
    version = cfg.get("version")
    if not _is_int(version, 0) or version not in VERSIONS:
        raise ValueError(f"{where}: format version {version!r} is not one this erm reads "
                         f"{VERSIONS} (saved by a newer erm, or edited)")
    for key in _REQUIRED:
        if key not in cfg:
            raise ValueError(f"{where}: the field {key!r} is missing")
    if version < 2 and "base_model_fingerprint" in cfg:
        raise ValueError(f"{where}: base_model_fingerprint is a version 2 field, but the "
                         f"config says version {version}")
    for key in _REQUIRED + _OPTIONAL:
        if key in cfg:
            problem = _field_problem(key, cfg[key])
            if problem is not None:
                raise ValueError(f"{where}: the field {key!r} must be {problem}, got "
                                 f"{cfg[key]!r}")
    return cfg


def read_config(path) -> dict:
    """The checked config of a saved SentenceRM directory `path`.

    Raises:
        FileNotFoundError: no such directory, or no sentence_rm.json in it.
        ValueError: the config is not valid UTF-8 JSON (or repeats a key), is of another
            format, has a version this erm does not know, or a field of the wrong type or out
            of range (the error names the file and the field).
    """
    p = Path(path) / CONFIG_NAME
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if not p.is_file():
        raise FileNotFoundError(f"{path}: not a saved SentenceRM (no {CONFIG_NAME})")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    return check_config(cfg, p)


def is_sentence_rm_dir(path) -> bool:
    """Whether `path` is a directory with a SentenceRM config (`sentence_rm.json`), valid or
    not: loading it then names whatever is wrong with the files (`read_config`)."""
    try:
        return (Path(path) / CONFIG_NAME).is_file()
    except (OSError, TypeError, ValueError):
        return False


def read_head(path, cfg: dict) -> Dict[str, Tensor]:
    """The head tensors of saved SentenceRM `path` ({name: float32 CPU tensor}).

    Raises:
        FileNotFoundError: no head.safetensors.
        ValueError (naming the file): not a safetensors file (truncated, garbage, a pickle),
            a tensor that is not floating point or holds NaN / inf, or a value head whose
            width is not the config's hidden_size.
    """
    from safetensors.torch import load_file

    f = Path(path) / HEAD_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (the head of the SentenceRM)")
    try:
        state = load_file(str(f))
    except Exception as exc:  # safetensors raises its own SafetensorError for bad bytes
        raise ValueError(f"{f}: not a readable safetensors file ({exc})") from None
    for name, t in state.items():
        if not t.is_floating_point():
            raise ValueError(f"{f}: tensor {name!r} is {t.dtype}, not floating point")
        bad = int((~t.isfinite()).sum())
        if bad:
            raise ValueError(f"{f}: tensor {name!r} holds {bad} non-finite value(s) (NaN or "
                             "inf): the head is unusable (saved from a diverged training?)")
    width = state.get("value.weight")
    if width is not None and "hidden_size" in cfg and width.shape[-1] != cfg["hidden_size"]:
        raise ValueError(f"{f}: the value head is {tuple(width.shape)}, but the config says "
                         f"hidden_size {cfg['hidden_size']}")
    return {k: v.float() for k, v in state.items()}


def fingerprint_changes(saved: dict, now: dict) -> List[str]:
    """What differs between two `erm.loading.weights_fingerprint` results of one model, one
    phrase each ([] when nothing does). The embedded default model ("kind": "embedded") is
    compared by its files' names and sizes (a reinstalled package changes only mtimes)."""
    embedded = saved.get("kind") == "embedded"
    was, now_files = saved.get("files") or {}, now.get("files") or {}
    out = []
    for name in sorted(set(was) | set(now_files)):
        if name not in now_files:
            out.append(f"{name} is gone")
        elif name not in was:
            out.append(f"{name} is new")
        else:
            a, b = was[name], now_files[name]
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key) and not (embedded and key != "size"):
                    out.append(f"{name} {key} {_short(a.get(key))} -> {_short(b.get(key))}")
    if not embedded and saved.get("config_sha256") != now.get("config_sha256"):
        out.append(f"config.json sha256 {_short(saved.get('config_sha256'))} -> "
                   f"{_short(now.get('config_sha256'))}")
    return out


def _short(x):
    return f"{x[:12]}…" if isinstance(x, str) and len(x) > 16 else x


def check_backbone(path, cfg: dict, check: bool = True, *, base: bool = False
                   ) -> Optional[dict]:
    """Compare the model a config names with the weights fingerprint saved beside it.

    Args:
        path: the saved SentenceRM directory (for the message).
        cfg: its checked config.
        check: False: weights that differ only warn (`UserWarning` naming the differences).
        base: False: the named backbone the head sits on (none when the backbone is saved in
            the directory); True: the base model (`erm eval`'s EndoRM beside the SentenceRM),
            also when the backbone was fine-tuned from it and saved.
    Returns:
        The current fingerprint (a dict) of the named model, or None when there is none to
        compare (saved backbone, no name, or the model is not found locally: loading it then
        says so). A version 1 config has no saved fingerprint: nothing is compared.
    Raises:
        ValueError: the weights or config found under that name differ from those saved
            (naming the files and what changed), unless check=False.
    """
    if base:
        if not cfg.get("base_model_named"):
            return None
        name, what = cfg.get("base_model"), "base model"
    elif cfg.get("backbone_saved") or not cfg.get("base_model_named", True):
        return None
    else:
        name, what = cfg["backbone"], "backbone"
    saved = cfg.get("base_model_fingerprint")
    now = weights_fingerprint(name)
    if now.get("files") is None:
        return None
    changes = fingerprint_changes(saved, now) if saved is not None else []
    if changes:
        msg = (f"{Path(path) / CONFIG_NAME}: the {what} {name or 'the embedded default model'}"
               f" is not the model this SentenceRM was saved with: {'; '.join(changes)}")
        if check:
            raise ValueError(msg + " (load with check_backbone=False to use these weights "
                             "anyway)")
        warnings.warn(msg + " (check_backbone=False: loaded anyway)", UserWarning, stacklevel=3)
    return now


def write_dir(out, cfg: dict, state: Dict[str, Tensor]) -> Path:
    """Write the head (`state`: {name: tensor}, stored float32) and the config (`cfg`, with
    "format" and "version" set to this erm's) into directory `out` (created), each through a
    temporary file renamed into place. Returns `out` as a Path."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    tmp = out / (HEAD_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out / HEAD_NAME)
    cfg = {"format": FORMAT, "version": VERSION, **{k: v for k, v in cfg.items()
                                                    if k not in ("format", "version")}}
    tmp = out / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, out / CONFIG_NAME)
    return out
