"""`pip install .` as a user runs it: a wheel built from a copy of the sources (setup.py, README,
erm/, kernels/, csrc/), installed into a scratch directory and imported from there, not from this
checkout. Once without the CUDA extension (any machine) and once with it, through setup.py's
CUDAExtension (one architecture; skipped without nvcc and a CUDA build of torch)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from .cuda_build import nvcc as _nvcc

ROOT = Path(__file__).resolve().parents[1]

_USE = """
import sys, torch, erm
site = sys.argv[1]
assert erm.__file__.startswith(site), erm.__file__          # the installed copy, not the checkout
import erm.kernels.autotune, erm.kernels.token_stats, erm.kernels.linear_token_stats  # noqa: E401
from importlib.resources import files
assert (files("erm") / "data" / "pairs.jsonl").is_file()
assert (files("erm") / "data" / "arithmetic.jsonl").is_file()
assert (files("erm") / "data" / "best_of_n.jsonl").is_file()
assert (files("erm") / "data" / "rmbench_demo.jsonl").is_file()
g = torch.Generator().manual_seed(0)
z = torch.randn(3, 50, generator=g) * 2
t = torch.randint(0, 50, (3,), generator=g)
ref = torch.log_softmax(z.double(), -1).gather(-1, t[:, None])[:, 0]
for backend in ("torch", "triton"):
    st = erm.token_stats(z, t, entropy=True, backend=backend)
    assert torch.allclose(st.logprob.double(), ref, atol=1e-5), backend
print("backends", erm.backends())
"""


def _copy_sources(dst):
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    for d in ("erm", "kernels", "csrc"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))


def _build_and_install(tmp, **env_extra):
    src, dist, site = tmp / "src", tmp / "dist", tmp / "site"
    src.mkdir()
    _copy_sources(src)
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                           "-w", str(dist), str(src)], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (whl,) = dist.glob("erm-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                    str(site), str(whl)], check=True, capture_output=True, timeout=300)
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        entry = [n for n in names if n.endswith("entry_points.txt")]
        assert entry and "erm = erm.cli:main" in z.read(entry[0]).decode()
    return names, site


def _run_installed(site, code, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code, str(site), *args], cwd=site.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_wheel_without_cuda(tmp_path):
    pytest.importorskip("triton")
    names, site = _build_and_install(tmp_path, ERM_BUILD_CUDA="0")
    for f in ("erm/__init__.py", "erm/cli/__init__.py", "erm/cli/score.py", "erm/serve/app.py",
              "erm/kernels/token_stats.py",
              "erm/kernels/linear_token_stats.py", "erm/kernels/autotune.py",
              "erm/data/pairs.jsonl", "erm/data/arithmetic.jsonl", "erm/data/best_of_n.jsonl",
              "erm/data/rmbench_demo.jsonl"):
        assert f in names, f
    assert not any(n.startswith("erm/_C") for n in names)
    out = _run_installed(site, _USE)
    assert "'cuda_built': False" in out


def _cuda_build_skip_reason():
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    nvcc = _nvcc()
    if nvcc is None:
        return "no CUDA toolkit (nvcc)"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    if f"release {torch.version.cuda.split('.')[0]}." not in out:
        return f"nvcc is not CUDA {torch.version.cuda.split('.')[0]}.x like torch"
    return None


def _fake_toolkit(tmp, release):
    home = tmp / "fake-cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(0o755)
    return home


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build")
def test_toolkit_of_another_cuda_major_is_skipped_or_refused(tmp_path):
    """torch refuses to build against a toolkit of another CUDA major version. Left to choose
    (ERM_BUILD_CUDA unset), setup.py skips the extension and says why, and the install works;
    forced (ERM_BUILD_CUDA=1), it fails with that reason."""
    pytest.importorskip("triton")
    other = str(int(torch.version.cuda.split(".")[0]) + 1) + ".0"
    home = _fake_toolkit(tmp_path, other)
    env = {k: v for k, v in os.environ.items() if k not in ("ERM_BUILD_CUDA", "CUDA_PATH")}
    env["CUDA_HOME"] = str(home)
    src = tmp_path / "src"
    src.mkdir()
    _copy_sources(src)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", "-w",
           str(tmp_path / "dist"), str(src)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the CUDA toolkit is {other} but torch was built with CUDA" in proc.stdout + proc.stderr
    (whl,) = (tmp_path / "dist").glob("erm-*.whl")
    with zipfile.ZipFile(whl) as z:
        assert not any(n.startswith("erm/_C") for n in z.namelist())
    proc = subprocess.run(cmd, env=dict(env, ERM_BUILD_CUDA="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert f"ERM_BUILD_CUDA=1 but the CUDA extension cannot be built: the CUDA toolkit is {other}" \
        in proc.stdout + proc.stderr


@pytest.mark.skipif(_cuda_build_skip_reason() is not None,
                    reason=f"cannot build the CUDA extension: {_cuda_build_skip_reason()}")
def test_wheel_with_cuda_extension(tmp_path):
    """setup.py's own CUDA build (ERM_BUILD_CUDA=1: fails loudly if it cannot build): the wheel
    carries erm/_C, which imports and registers its ops even on a machine without a GPU."""
    pytest.importorskip("triton")
    arch = "9.0"
    if torch.cuda.is_available():
        arch = "{}.{}".format(*torch.cuda.get_device_capability())
    names, site = _build_and_install(tmp_path, ERM_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=arch,
                                     MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    assert any(n.startswith("erm/_C") and n.endswith(".so") for n in names), names
    out = _run_installed(site, _USE + """
import erm._C  # noqa: F401
assert hasattr(torch.ops.erm_C, "token_stats_fwd") and hasattr(torch.ops.erm_C, "token_stats_bwd")
""")
    assert "'cuda_built': True" in out


def test_import_erm_leaves_argparse_to_the_command_line():
    """`import erm` loads none of erm's command line: no erm module it imports holds argparse,
    and only the modules under erm/cli/ import it. (torch itself imports argparse, through
    unittest, so `'argparse' in sys.modules` says nothing about erm.)"""
    code = ("import sys, erm\n"
            "loaded = {n: m for n, m in sys.modules.items() if n == 'erm' or n.startswith('erm.')}\n"
            "assert not any(n == 'erm.cli' or n.startswith('erm.cli.') for n in loaded), loaded\n"
            "bad = [n for n, m in loaded.items() if 'argparse' in vars(m)]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import ast
    importers = []
    for path in sorted((ROOT / "erm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "argparse" in names:
                importers.append(path.relative_to(ROOT).as_posix())
    assert importers and all(p.startswith("erm/cli/") for p in importers), importers
