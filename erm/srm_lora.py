"""LoRA adapters of a `SentenceRM`'s backbone (peft, an optional dependency): put on for training
(`erm.train_sentence_rm(..., lora_rank=R)`), saved alone beside the head when the base model has
a name (`SentenceRM.save_pretrained` writes `adapter/`: peft's adapter_config.json and
adapter_model.safetensors), applied again by `SentenceRM.from_pretrained` on the named base.

    apply_lora(rm, 16)            # rm.backbone becomes a peft model; only the adapters train
    is_adapted(rm.backbone)       # True
"""
import copy
from pathlib import Path

__all__ = ["apply_lora", "is_adapted", "merged", "save_adapter", "load_adapter", "ADAPTER_DIR"]

#: Where `SentenceRM.save_pretrained` puts the adapter of a named base model.
ADAPTER_DIR = "adapter"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA adapters need peft: pip install peft") from None
    return peft


def apply_lora(rm, rank: int) -> None:
    """Put rank-`rank` LoRA adapters (alpha = 2·rank, no dropout) on every linear layer of
    `rm`'s backbone (`rm.backbone` becomes a peft model; only the adapters require grad).
    ImportError without peft."""
    peft = _peft()
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                          target_modules="all-linear", bias="none")
    rm.backbone = peft.get_peft_model(rm.backbone, cfg)


def is_adapted(model) -> bool:
    """Whether `model` is a peft model (LoRA adapters on a base model)."""
    return getattr(model, "peft_config", None) is not None and hasattr(model, "get_base_model")


def merged(model):
    """`model` itself, or for a peft model a copy with its adapters merged into the weights
    (a plain transformers model)."""
    return copy.deepcopy(model).merge_and_unload() if is_adapted(model) else model


def save_adapter(model, folder) -> Path:
    """Write the adapters of peft model `model` to `folder` (safetensors + JSON)."""
    model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def load_adapter(model, folder):
    """`model` with the adapters saved in `folder` merged into it (a plain transformers model).

    Raises:
        ImportError: peft is not installed.
        FileNotFoundError: `folder` holds no adapter (adapter_config.json).
    """
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no LoRA adapter (adapter_config.json) to apply")
    peft = _peft()
    return peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
