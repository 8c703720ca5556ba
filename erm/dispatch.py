"""Which implementation runs an op: `cuda` (the compiled extension in csrc/), `triton` (kernels/),
or `torch` (chunked PyTorch, any device).

`backend="auto"` (the default) picks, for CUDA tensors, the CUDA extension when it was built, else
Triton, else torch; for CPU tensors, torch. The environment variable `ERM_BACKEND` overrides
"auto" everywhere. Triton runs on CPU tensors only under `TRITON_INTERPRET=1` (how the test suite
checks the kernels without a GPU). Set `ERM_LOG=debug` to log each choice.
"""
import functools
import importlib
import logging
import os

log = logging.getLogger("erm")
if os.environ.get("ERM_LOG", "").lower() == "debug":
    logging.basicConfig()
    log.setLevel(logging.DEBUG)

NAMES = ("auto", "cuda", "triton", "torch")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled module `erm._C`, or None when it was not built (or cannot load)."""
    try:
        return importlib.import_module("erm._C")
    except Exception as exc:  # not built, or built against another torch
        log.debug("erm._C unavailable: %s", exc)
        return None


def backends() -> dict:
    """What can run here: {name: bool} for "cuda", "triton" (GPU or interpreter) and "torch"."""
    import torch

    gpu = torch.cuda.is_available()
    return {
        "cuda": cuda_extension() is not None and gpu,
        "cuda_built": cuda_extension() is not None,
        "triton": _has_triton() and (gpu or triton_interpret()),
        "torch": True,
    }


def resolve(backend: str, device, dtype=None) -> str:
    """Map a requested backend name to the one that will run for tensors on `device` (float64
    tensors go to torch under "auto": the kernels are for float32 and narrower)."""
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("ERM_BACKEND", "auto").strip().lower() or "auto"
        if backend not in NAMES:
            raise ValueError(f"ERM_BACKEND must be one of {NAMES}, got {backend!r}")
    on_cuda = getattr(device, "type", str(device)) == "cuda"
    if backend == "auto":
        import torch

        if dtype == torch.float64:
            choice = "torch"
        elif on_cuda and cuda_extension() is not None:
            choice = "cuda"
        elif on_cuda and _has_triton():
            choice = "triton"
        else:
            choice = "torch"
        log.debug("erm: backend auto -> %s for device %s", choice, device)
        return choice
    if backend == "cuda":
        if not on_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors")
        if cuda_extension() is None:
            raise RuntimeError("backend='cuda' but the CUDA extension erm._C was not built "
                               "(reinstall with ERM_BUILD_CUDA=1 pip install --no-build-isolation .)")
    if backend == "triton":
        if not _has_triton():
            raise RuntimeError("backend='triton' but triton is not installed")
        if not on_cuda and not triton_interpret():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend
