"""Compile erm's Triton kernels ahead of time for sm_80 and sm_90 on a machine without a GPU
(Triton ships ptxas): catches GPU-only compile errors that the interpreter cannot see.

Run by tests/test_triton_compile.py in a subprocess with TRITON_INTERPRET unset (the interpreter
replaces @triton.jit functions with Python ones). Prints one line per kernel variant compiled.
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import erm.kernels.linear_token_stats as lk
import erm.kernels.token_stats as tk


# Integer arguments that are multiples of 16 at the benchmark shapes (N=8192, V=151936, D=3584,
# contiguous rows; vocab chunks are multiples of 256), so the JIT specialises them that way.
ALIGNED_INTS = {"N", "V", "D", "stride_h", "stride_w", "stride_dz", "s_outer", "s_inner", "v_chunk",
                "split_len"}


def _jit(kernel):
    """The JITFunction under any autotune/heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, target, ptrs, floats, consts, num_warps=8, num_stages=3,
                   aligned=True):
    """Compile one variant. aligned=True gives every pointer and integer argument the
    divisibility-by-16 hint that the JIT gives them at run time when they are multiples of 16
    (aligned tensors, V=151936, D=3584, N=8192, their strides): without it Triton can neither
    vectorise the loads nor pipeline them, and the PTX would not be what a GPU runs."""
    jf = _jit(kernel)
    sig = {}
    for name in jf.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name.startswith("s_") else "i32"
    aligned_idx = [i for i, name in enumerate(jf.arg_names)
                   if aligned and (sig[name].startswith("*") or name in ALIGNED_INTS)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned_idx}
    if hasattr(triton.backends.compiler, "AttrsDescriptor"):  # Triton < 3.3
        attrs = triton.backends.compiler.AttrsDescriptor.from_hints({i: 16 for i in aligned_idx})
        sig = {k: v for k, v in sig.items() if v != "constexpr"}
    c = triton.compile(ASTSource(jf, sig, consts, attrs), target=target,
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    assert c.asm["ptx"], jf.__name__
    return c


def ptxas_usage(c, cc):
    """(registers, spill-store bytes) of a compiled kernel, from Triton's own ptxas -v, or None
    when that ptxas is not shipped."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(exe):
        return None
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(c.asm["ptx"])
        arch = "sm_90a" if cc == 90 else f"sm_{cc}"
        out = subprocess.run([exe, "-v", f"-arch={arch}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spill


def describe(name, cc, dt, c, usage):
    """One line per variant: what a GPU would run. v4 = 16-byte vector loads; cp.async = loads
    pipelined through shared memory; wgmma = Hopper tensor-core instructions."""
    ptx = c.asm["ptx"]
    feats = [f for f, pat in (("v4", "ld.global.v4"), ("cp.async", "cp.async"),
                              ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))
             if pat in ptx]
    use = f" regs={usage[0]} spill={usage[1]}" if usage else ""
    return (f"variant {name} sm_{cc} {dt}:{use} smem={c.metadata.shared} "
            f"features={','.join(feats) or '-'}")


def main(argv):
    """`--full`: sm_80 and sm_90, with and without entropy; default: sm_90 with entropy.
    `--ptxas`: also report registers and spills per variant (Triton's ptxas -v)."""
    full = "--full" in argv
    report = "--ptxas" in argv
    n = 0

    def build(name, cc, dt, *args, **kw):
        nonlocal n
        c = compile_kernel(*args, **kw)
        n += 1
        print(describe(name, cc, dt, c, ptxas_usage(c, cc) if report else None), flush=True)

    for cc in (80, 90) if full else (90,):
        tgt = GPUTarget("cuda", cc, 32)
        for dt in ("bf16", "fp16", "fp32"):
            for ent in (False, True) if full else (True,):
                e = "+ent" if ent else ""
                io = dict(z_ptr=dt, t_ptr="i64", lp_ptr="fp32", lse_ptr="fp32", tl_ptr="fp32",
                          ent_ptr="fp32", st_ptr="fp32", ws_ptr="fp32")
                for splits in (1, 8):
                    build(f"token_stats.fwd{e}/splits={splits}", cc, dt, tk._fwd_kernel, tgt, io,
                          {"inv_alpha"}, dict(SPLITS=splits, BLOCK_V=4096, WITH_ENT=ent))
                build(f"token_stats.combine{e}", cc, dt, tk._combine_kernel, tgt, io,
                      {"inv_alpha"}, dict(SPLITS=8, WITH_ENT=ent), num_warps=1)
                bio = dict(z_ptr=dt, t_ptr="i64", st_ptr="fp32", ent_ptr="fp32", glp_ptr="fp32",
                           glse_ptr="fp32", gtl_ptr="fp32", gent_ptr="fp32", dz_ptr=dt)
                build(f"token_stats.bwd{e}", cc, dt, tk._bwd_kernel, tgt, bio, {"inv_alpha"},
                      dict(HAS_LP=True, HAS_LSE=True, HAS_TL=ent, HAS_ENT=ent, BLOCK_V=4096))
        for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
            common = dict(HAS_BIAS=True, WITH_ENT=True, PRECISION=prec, UPCAST=False, GROUP=16,
                          BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, EVEN_D=dt == "bf16")
            p = dict(h_ptr=dt, w_ptr=dt, b_ptr=dt, t_ptr="i64")
            build("linear.fwd", cc, dt, lk._fwd_kernel, tgt,
                  dict(p, m_ptr="fp32", s_ptr="fp32", e_ptr="fp32", z_ptr="fp32"), {"inv_alpha"},
                  common)
            bp = dict(p, st_ptr="fp32", c_ptr="fp32", gh_ptr="fp32", ent_ptr="fp32", tw_ptr="fp32")
            build("linear.dz", cc, dt, lk._dz_kernel, tgt, dict(bp, dz_ptr=dt), {"inv_alpha"},
                  common)
            build("linear.bwd_atomic", cc, dt, lk._bwd_atomic_kernel, tgt,
                  dict(bp, dh_ptr="fp32", dw_ptr="fp32", db_ptr="fp32"), {"inv_alpha"},
                  dict(common, NEED_H=True, NEED_W=True, NEED_B=True))
        print(f"sm_{cc}: ok", flush=True)
    print(f"compiled {n} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
