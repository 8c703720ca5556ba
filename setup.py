"""Build and install erm.

`pip install .` works on any machine. The CUDA C++ extension (`erm._C`, sources in `csrc/`) is
built when a CUDA toolkit and a CUDA-enabled torch are importable at build time; otherwise erm runs
on its Triton and PyTorch backends. `ERM_BUILD_CUDA=1` forces the build (and fails loudly if it
cannot), `ERM_BUILD_CUDA=0` skips it. `TORCH_CUDA_ARCH_LIST` picks the architectures
(default: 8.0 and 9.0).

Because the build needs the torch you run with, install with `--no-build-isolation` when you want
the CUDA extension: `pip install --no-build-isolation .`
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _fix_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; an nvcc wrapper script outside the toolkit (e.g.
    /usr/local/bin/nvcc) misleads it into a prefix without headers or libraries. When that happens
    and CUDA_HOME/CUDA_PATH are unset, point CUDA_HOME at a toolkit that has them."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    has_headers = lambda d: os.path.exists(os.path.join(d, "include", "cuda_runtime.h"))  # noqa: E731
    nvcc = shutil.which("nvcc")
    if nvcc is None or has_headers(os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        return
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if has_headers(cand) and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


def _nvcc_version(cuda_home):
    """'13.0' from `nvcc --version` of the toolkit at cuda_home, or None."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cuda_extension():
    """Return (ext_modules, cmdclass) for the CUDA extension, or ([], {}) when it is skipped."""
    flag = os.environ.get("ERM_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return [], {}
    forced = flag in ("1", "true", "yes", "on")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    _fix_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing at build time (e.g. build isolation)
        if forced:
            raise RuntimeError(f"ERM_BUILD_CUDA=1 but torch cannot be imported at build time: {exc}")
        print("erm: torch not importable at build time; skipping the CUDA extension", file=sys.stderr)
        return [], {}
    reason = None
    if not sources:
        reason = "no sources in csrc/"
    elif torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit (nvcc) found"
    else:
        toolkit = _nvcc_version(CUDA_HOME)
        if toolkit is None:
            reason = f"cannot run {os.path.join(CUDA_HOME, 'bin', 'nvcc')} --version"
        elif toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
            # torch's BuildExtension refuses a different major version; say why and go on
            reason = (f"the CUDA toolkit is {toolkit} but torch was built with CUDA "
                      f"{torch.version.cuda}; install a toolkit of the same major version")
    if reason:
        if forced:
            raise RuntimeError(f"ERM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"erm: skipping the CUDA extension ({reason})", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="erm._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],  # the C++ standard comes from torch (C++20 for torch >= 2.10)
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="erm",
    version="0.1.0",
    description="Endogenous reward models from any causal LM, with fused Triton/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder and install as erm.kernels.
    packages=["erm", "erm.cli", "erm.data", "erm.ops", "erm.kernels", "erm.integrations",
              "erm.serve"],
    package_dir={"erm": "erm", "erm.kernels": "kernels"},
    package_data={"erm": ["data/*.jsonl"]},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "models": ["transformers>=5.0", "gguf>=0.10", "accelerate>=1.0", "safetensors"],
        "plot": ["matplotlib"],
        "bench": ["pytest-benchmark", "liger-kernel", "cut-cross-entropy"],
        "test": ["pytest", "pytest-benchmark"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        "verl": ["verl>=0.9.1"],
        "lora": ["peft>=0.13"],   # erm train-srm --lora-rank
    },
    # verl imports every `verl.plugins` entry point at start-up: this one registers the reward
    # manager `erm` (erm/integrations/verl_manager.py)
    entry_points={"console_scripts": ["erm=erm.cli:main"],
                  "verl.plugins": ["erm=erm.integrations.verl_manager"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
