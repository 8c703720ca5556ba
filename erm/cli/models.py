"""Loading the model a command scores with: an EndoRM from --model (or the embedded default), a
SentenceRM saved by `erm train-srm`, or the model a caller passes to `erm.cli.main(argv, rm=...)`;
each with the model options given on the command line."""
import time
from pathlib import Path

from .options import CLIError, log, model_overrides, srm_overrides


def load_rm(args, rm=None):
    """The EndoRM: `rm` when given (--batch-size, --alpha and --gamma set on it), else
    `EndoRM.from_pretrained(--model)` with --device or --device-map, --dtype and the
    `model_overrides`."""
    if rm is not None:
        for name in ("batch_size", "alpha", "gamma"):
            if getattr(args, name, None) is not None:
                try:
                    setattr(rm, name, getattr(args, name))
                except AttributeError:
                    pass
        return rm
    from ..model import EndoRM
    kwargs = {"dtype": getattr(args, "dtype", None), **model_overrides(args)}
    device_map = getattr(args, "device_map", None)
    if device_map is not None:
        kwargs["device_map"] = device_map
    else:
        kwargs["device"] = getattr(args, "device", None)
    model = getattr(args, "model", None)
    if getattr(args, "quiet", False):  # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        out = EndoRM.from_pretrained(model, **kwargs)
    except ImportError as exc:  # e.g. the default model's package is not installed
        raise CLIError(str(exc)) from None
    except (OSError, ValueError) as exc:  # missing directory, not a causal LM, ...
        raise CLIError(f"cannot load model {model or '(default)'}: {exc}") from None
    log(args, f"loaded {model or 'the default model (SmolLM2-135M-Instruct)'} "
              f"in {time.perf_counter() - t0:.1f}s")
    return out


def check_srm_options(args, model, alone: bool = True) -> None:
    """A SentenceRM loads on one device (no --device-map) and, scored `alone` (not beside an
    EndoRM), takes no --alpha or --gamma, which only an EndoRM has."""
    names = ("alpha", "gamma", "device_map") if alone else ("device_map",)
    given = [f"--{k.replace('_', '-')}" for k in names if getattr(args, k, None) is not None]
    if given:
        raise CLIError(f"{' and '.join(given)}: {model} is a SentenceRM (saved by erm "
                       "train-srm), which loads on one --device and has no alpha or gamma; "
                       f"leave {'them' if len(given) > 1 else 'it'} out")


def load_srm(args, model=None, alone: bool = True):
    """A trained `erm.SentenceRM` when `model` (default --model) is a directory saved by
    `erm train-srm`, else None; --system-prompt, --batch-size and --max-length override its
    config (`check_srm_options` first)."""
    from ..sentence_rm import SentenceRM, is_sentence_rm_dir
    model = model or getattr(args, "model", None)
    if not model or not is_sentence_rm_dir(model):
        return None
    check_srm_options(args, model, alone)
    try:
        return SentenceRM.from_pretrained(model, device=getattr(args, "device", None),
                                          dtype=getattr(args, "dtype", None),
                                          **srm_overrides(args))
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot load the SentenceRM in {model}: {exc}") from None


def model_label(args, rm) -> str:
    """The model's name for reports: --model, else the name the config of its `causal_lm`
    records (`rm` None: the embedded model's)."""
    if getattr(args, "model", None):
        return args.model
    cfg = getattr(rm.causal_lm, "config", None) if rm is not None else None
    name = getattr(cfg, "_name_or_path", "") or ""
    return Path(name).name if name else "SmolLM2-135M-Instruct"


def parameter_dtype(rm):
    """The dtype name of the first parameter of the scorer's causal LM (`rm.causal_lm`: an
    EndoRM's model, a SentenceRM's backbone), e.g. "float32"; None when it has none."""
    try:
        return str(next(rm.causal_lm.parameters()).dtype).replace("torch.", "")
    except (AttributeError, StopIteration, TypeError):
        return None
