"""The CUDA C++ backend (csrc/, erm._C, erm/ops/cuda_impl.py).

* `test_extension_builds_and_registers` (CPU CI): compiles csrc/ with torch.utils.cpp_extension
  (one architecture; the build directory lives in the pytest cache, so it builds once and later runs
  only relink what changed), loads it in a subprocess and checks the op schemas. Skipped when torch
  is a CPU build or nvcc is missing.
* The rest need a GPU: parity of `backend="cuda"` with a float64 reference and with the Triton
  backend, forward and backward, over dtypes, shapes and awkward inputs. They use the installed
  `erm._C` when present, else the module built by the first test.
"""
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import erm
from erm import dispatch

from .reference import token_stats_ref

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
JIT_NAME = "erm_C_jit"
GPU = torch.cuda.is_available()

FWD_SCHEMA = ("erm_C::token_stats_fwd(Tensor logits, Tensor targets, float alpha, int ignore_index, "
              "bool with_entropy, int inner_rows, int stride_outer, int stride_inner) "
              "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
BWD_SCHEMA = ("erm_C::token_stats_bwd(Tensor logits, Tensor targets, Tensor state, Tensor ent, "
              "Tensor? g_lp, Tensor? g_lse, Tensor? g_tl, Tensor? g_ent, float alpha, "
              "int ignore_index, int inner_rows, int stride_outer, int stride_inner) -> Tensor")


def _build_skip_reason():
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not (
            shutil.which("nvcc") or Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists()):
        return "no CUDA toolkit (nvcc)"
    if not list(CSRC.glob("*.cu")):
        return "no CUDA sources in csrc/"
    return None


def _load_kwargs(build_dir):
    sources = sorted(str(p) for p in list(CSRC.glob("*.cpp")) + list(CSRC.glob("*.cu")))
    return dict(name=JIT_NAME, sources=sources, extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
                build_directory=str(build_dir), verbose=False)


def _cuda_home_fix():
    """CUDA_HOME to use when torch's guess (from `which nvcc`) has no headers, e.g. when nvcc is a
    wrapper script in /usr/local/bin (the same fix as setup.py's _fix_cuda_home); else None."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    has_headers = lambda d: Path(d, "include", "cuda_runtime.h").exists()  # noqa: E731
    nvcc = shutil.which("nvcc")
    if nvcc is None or has_headers(Path(os.path.realpath(nvcc)).parent.parent):
        return None
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if has_headers(cand) and Path(cand, "bin", "nvcc").exists():
            return cand
    return None


def _build_env():
    env = dict(os.environ)
    home = _cuda_home_fix()
    if home:
        env["CUDA_HOME"] = home
    if "TORCH_CUDA_ARCH_LIST" not in env:
        if GPU:  # build for the GPU we test on, only
            major, minor = torch.cuda.get_device_capability()
            env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    env.setdefault("MAX_JOBS", "2")
    return env


_PROBE = textwrap.dedent("""
    import json, sys, torch
    from torch.utils import cpp_extension
    kwargs = json.loads(sys.argv[1])
    mod = cpp_extension.load(**kwargs)
    ops = torch.ops.erm_C
    out = {"file": mod.__file__, "module": mod.__name__,
           "fwd": str(ops.token_stats_fwd.default._schema),
           "bwd": str(ops.token_stats_bwd.default._schema)}
    # no CPU kernel: calling with CPU tensors must fail cleanly, not crash
    try:
        ops.token_stats_fwd(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0, -100, False,
                            2, 0, 3)
        out["cpu_call"] = "ran"
    except (NotImplementedError, RuntimeError) as exc:
        out["cpu_call"] = type(exc).__name__
    print("ERM_PROBE " + json.dumps(out))
""")


@pytest.fixture(scope="session")
def ext_build(request, tmp_path_factory):
    """Build csrc/ once per session (incrementally across sessions) in a subprocess; returns the
    build directory and what the probe saw."""
    reason = _build_skip_reason()
    if reason:
        pytest.skip(f"cannot build the CUDA extension: {reason}")
    cache = getattr(request.config, "cache", None)
    build_dir = (Path(cache.mkdir("erm_cuda_ext")) if cache is not None
                 else tmp_path_factory.mktemp("erm_cuda_ext"))
    kwargs = _load_kwargs(build_dir)
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(kwargs)], env=_build_env(),
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"building the CUDA extension failed:\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERM_PROBE ")][-1]
    return build_dir, json.loads(line[len("ERM_PROBE "):])


def test_extension_builds_and_registers(ext_build):
    _, probe = ext_build
    assert probe["fwd"] == FWD_SCHEMA
    assert probe["bwd"] == BWD_SCHEMA
    assert probe["module"] == JIT_NAME
    assert probe["cpu_call"] == "NotImplementedError"


def _nvcc():
    from torch.utils import cpp_extension

    home = _cuda_home_fix() or cpp_extension.CUDA_HOME
    cand = Path(home, "bin", "nvcc") if home else None
    return str(cand) if cand and cand.exists() else shutil.which("nvcc")


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """What an H100 would run, checked where none exists: csrc/token_stats.cu (free of torch
    headers) compiled for sm_90 with ptxas -v. Every kernel fits its registers (no spill stores),
    the forward reads logits with 16-byte non-coherent vector loads (ld.global.nc.v4) and the
    backward writes gradients with 16-byte stores (st.global.v4)."""
    nvcc = _nvcc()
    if nvcc is None or torch.version.cuda is None:
        pytest.skip("no nvcc")
    src = str(CSRC / "token_stats.cu")
    common = [nvcc, "-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90", f"-I{CSRC}", src]
    proc = subprocess.run(common + ["-Xptxas", "-v", "-c", "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = re.findall(r"Compiling entry function '(\w+)'", proc.stderr)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    assert len(kernels) >= 15 and len(spills) == len(kernels), proc.stderr[-2000:]
    for name in ("fwd_kernel", "bwd_kernel", "combine_kernel"):
        assert any(name in k for k in kernels), (name, kernels)
    assert spills == [0] * len(kernels), proc.stderr
    proc = subprocess.run(common + ["-ptx", "-o", str(tmp_path / "k.ptx")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert "ld.global.nc.v4" in ptx
    assert "st.global.v4" in ptx


# ---------------------------------------------------------------------------------------------
# GPU parity


@pytest.fixture(scope="session")
def cuda_backend(request):
    """Make backend="cuda" usable: the installed erm._C, else the JIT build of csrc/."""
    if not GPU:
        pytest.skip("needs a CUDA GPU")
    if dispatch.cuda_extension() is None:
        build_dir, _ = request.getfixturevalue("ext_build")
        from torch.utils import cpp_extension

        os.environ.update({k: v for k, v in _build_env().items()
                           if k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME")})
        mod = cpp_extension.load(**_load_kwargs(build_dir))  # already built: only imports
        sys.modules["erm._C"] = mod
        dispatch.cuda_extension.cache_clear()
    assert dispatch.cuda_extension() is not None
    return "cuda"


def _has_triton_backend():
    try:
        import triton  # noqa: F401

        from erm.kernels import token_stats  # noqa: F401
        return True
    except Exception:
        return False


def _poison(*shapes_dtypes, copies=8):
    """Fill caching-allocator blocks of the sizes the op will allocate with NaN, so that elements
    the kernels fail to write show up as NaN (the op allocates its outputs itself)."""
    keep = [torch.full(shape, float("nan"), dtype=dt, device="cuda")
            for shape, dt in shapes_dtypes for _ in range(copies)]
    torch.cuda.synchronize()
    del keep


def _make(n, v, dtype, *, seed=0, special=True, strided=False):
    """(logits, targets) on the GPU: scaled normals; with `special`, every 5th row is ignored, and
    others get −inf entries, ±1e4 entries, or a constant value. With `strided`, logits is the
    non-contiguous view big[:, :-1] of a (B, T+1, V) tensor holding about n rows."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if strided:
        b = 3
        t = max(1, -(-n // b))
        big = torch.randn(b, t + 1, v, generator=g) * 4
        view = big[:, :-1]
    else:
        big = torch.randn(n, v, generator=g) * 4
        view = big
    lead = tuple(view.shape[:-1])
    targets = torch.randint(0, v, lead, generator=g)
    if special:
        for r, idx in enumerate(itertools.product(*[range(k) for k in lead])):
            row = view[idx]  # 1-D view into big
            kind = r % 5
            if kind == 1:
                targets[idx] = -100
            elif kind == 2:  # −inf entries, not at the target
                cols = torch.arange(r % 7, v, 7)
                row[cols[cols != targets[idx]]] = float("-inf")
            elif kind == 3:  # very large and very small logits
                row[0] = 1e4
                row[v // 2] = 1e4
                row[v - 1] = -1e4
            elif kind == 4:  # all equal
                row.fill_(2.5)
    dev = big.to("cuda", dtype)
    return (dev[:, :-1] if strided else dev), targets.cuda()


def _row_scale(logits, alpha):
    """max |finite logit| / α per row (shape of targets): the scale of fp32 rounding errors."""
    z = logits.detach().double()
    z = torch.where(torch.isfinite(z), z, torch.zeros((), dtype=z.dtype, device=z.device))
    return z.abs().amax(-1) / alpha


def _weights(shape, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).cuda() for _ in range(4)]


def _reference(logits, targets, alpha, weights):
    """float64 outputs and gradient of loss = Σ_k w_k·out_k (tests/reference.py)."""
    z = logits.detach().double().requires_grad_(True)
    st = token_stats_ref(z, targets, alpha)
    loss = sum((w * o).sum() for w, o in zip(weights, st))
    (g,) = torch.autograd.grad(loss, z)
    return [o.detach() for o in st], g


def _grad_run(logits, targets, alpha, weights, backend):
    """Forward + backward through erm.token_stats, with a leaf that keeps logits' layout."""
    if logits.is_contiguous():
        leaf = logits.detach().clone().requires_grad_(True)
        z = leaf
    else:  # a view such as base[:, :-1]: same strides into a leaf copy of the base
        leaf = logits._base.detach().clone().requires_grad_(True)
        z = leaf.as_strided(logits.shape, logits.stride(), logits.storage_offset())
        assert not z.is_contiguous()
    n, v = targets.numel(), logits.shape[-1]
    _poison(*[((n,), torch.float32)] * 4, ((n, v), logits.dtype))
    st = erm.token_stats(z, targets, temperature=alpha, entropy=True, backend=backend)
    loss = sum((w.to(o.dtype) * o).sum() for w, o in zip(weights, st))
    (g,) = torch.autograd.grad(loss, leaf)
    if not logits.is_contiguous():
        g = g.as_strided(logits.shape, logits.stride(), logits.storage_offset())
    return [o.detach() for o in st], g


EPS = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _check(name, out, ref, scale, dtype, kind, slack=1.0):
    """out vs ref where ref is finite; no NaN in out where ref has none. `scale` is per row."""
    out, ref = out.double(), ref.double()
    assert not (torch.isnan(out) & ~torch.isnan(ref)).any(), \
        f"{name}: NaN where the reference has none (unwritten or poisoned elements?)"
    fin = torch.isfinite(ref)
    assert torch.equal(out[~fin].nan_to_num(0.0), ref[~fin].nan_to_num(0.0)), f"{name}: ±inf mismatch"
    err = (out - ref).abs()
    if kind == "stat":  # float32 outputs: error ~ fp32 eps × the row's logit scale
        tol = 2e-5 + 1e-6 * scale + 1e-5 * ref.abs()
    else:  # gradients, rounded to the input dtype
        rmax = torch.where(fin, ref.abs(), torch.zeros_like(ref)).amax(-1, keepdim=True)
        tol = 2 * EPS[dtype] * ref.abs() + (2 * EPS[dtype] + 4e-7 * scale.unsqueeze(-1)) * rmax
    bad = fin & ~(err <= slack * tol)
    assert not bad.any(), (f"{name}: max err {err[fin].max().item():.3g}, "
                           f"{int(bad.sum())} element(s) out of tolerance")


def _compare(logits, targets, alpha, backend, *, check_grad=True):
    weights = _weights(targets.shape)
    ref, gref = _reference(logits, targets, alpha, weights)
    out, g = _grad_run(logits, targets, alpha, weights, backend)
    scale = _row_scale(logits, alpha)
    for name, o, r in zip(("logprob", "lse", "target_logit", "entropy"), out, ref):
        assert o.dtype == torch.float32 and o.shape == targets.shape
        _check(name, o, r, scale, logits.dtype, "stat")
    if check_grad:
        assert g.dtype == logits.dtype and g.shape == logits.shape
        _check("grad", g, gref, scale, logits.dtype, "grad")
    return out, g


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [1000, 32003, 151936])
@pytest.mark.parametrize("n", [1, 7, 300])
def test_cuda_matches_float64(cuda_backend, n, v, dtype):
    logits, targets = _make(n, v, dtype, seed=n * 7 + v)
    _compare(logits, targets, 0.7, cuda_backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", [(9, 1000), (9, 32003), (300, 1000), (2, 151936)])
def test_cuda_strided_view(cuda_backend, n, v, dtype):
    logits, targets = _make(n, v, dtype, strided=True, seed=v)
    assert not logits.is_contiguous()
    _compare(logits, targets, 0.7, cuda_backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [3, 300])
def test_cuda_rows_at_every_alignment(cuda_backend, n, dtype):
    """Rows starting at every 16-byte phase (odd V, storage offset, row stride != V)."""
    v = 1003
    big, targets = _make(n, v + 1, dtype, seed=5)
    logits = big[:, 1:]  # storage offset 1, row stride V + 1: read in place, no copy
    targets = torch.where(targets == v, torch.zeros_like(targets), targets)
    _compare(logits, targets, 1.3, cuda_backend)  # grad (N, V) contiguous: other phases than input
    _compare(logits.contiguous(), targets, 1.3, cuda_backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_without_entropy_and_partial_grads(cuda_backend, dtype):
    logits, targets = _make(64, 5000, dtype, seed=3)
    scale = _row_scale(logits, 0.7)
    ref = erm.token_stats(logits.double(), targets, temperature=0.7, backend="torch")
    st = erm.token_stats(logits, targets, temperature=0.7, backend="cuda")
    assert st.entropy is None
    for name, o, r in zip(("logprob", "lse", "target_logit"), st[:3], ref[:3]):
        _check(name, o, r, scale, dtype, "stat")
    # only logprob upstream (the common RL case)
    z = logits.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(
        erm.token_logprobs(z, targets, temperature=0.7, backend="cuda").sum(), z)
    z64 = logits.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(
        erm.token_logprobs(z64, targets, temperature=0.7, backend="torch").sum(), z64)
    _check("grad(logprob)", g, g64, scale, dtype, "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", [(1, 151936), (7, 32003), (300, 32003), (33, 1000)])
def test_cuda_matches_triton(cuda_backend, n, v, dtype):
    if not _has_triton_backend():
        pytest.skip("Triton backend unavailable")
    logits, targets = _make(n, v, dtype, seed=11)
    weights = _weights(targets.shape, seed=2)
    out_c, g_c = _grad_run(logits, targets, 0.7, weights, "cuda")
    out_t, g_t = _grad_run(logits, targets, 0.7, weights, "triton")
    scale = _row_scale(logits, 0.7)
    for name, a, b in zip(("logprob", "lse", "target_logit", "entropy"), out_c, out_t):
        _check(name, a, b, scale, dtype, "stat", slack=2.0)
    _check("grad", g_c, g_t, scale, dtype, "grad", slack=2.0)


@pytest.mark.gpu
def test_cuda_auto_picks_cuda(cuda_backend, monkeypatch):
    monkeypatch.delenv("ERM_BACKEND", raising=False)
    from erm.ops.token_stats import BACKENDS
    assert dispatch.select(BACKENDS, "auto", torch.device("cuda"), torch.bfloat16)[0] == "cuda"
