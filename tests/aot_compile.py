"""Compile erm's Triton kernels ahead of time for sm_80 and sm_90 on a machine without a GPU
(Triton ships ptxas): catches GPU-only compile errors that the interpreter cannot see.

Run by tests/test_triton_compile.py in a subprocess with TRITON_INTERPRET unset (the interpreter
replaces @triton.jit functions with Python ones). Prints one line per kernel variant compiled.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import erm.kernels.linear_token_stats as lk
import erm.kernels.token_stats as tk


def _jit(kernel):
    """The JITFunction under any autotune/heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, target, ptrs, floats, consts, num_warps=8, num_stages=3):
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
    c = triton.compile(ASTSource(jf, sig, consts), target=target,
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    assert c.asm["ptx"], jf.__name__
    return c


def main(argv):
    """`--full`: sm_80 and sm_90, with and without entropy; default: sm_90 with entropy."""
    full = "--full" in argv
    n = 0
    for cc in (80, 90) if full else (90,):
        tgt = GPUTarget("cuda", cc, 32)
        for dt in ("bf16", "fp16", "fp32"):
            for ent in (False, True) if full else (True,):
                io = dict(z_ptr=dt, t_ptr="i64", lp_ptr="fp32", lse_ptr="fp32", tl_ptr="fp32",
                          ent_ptr="fp32", ws_ptr="fp32")
                for splits in (1, 8):
                    compile_kernel(tk._fwd_kernel, tgt, io, {"inv_alpha"},
                                   dict(SPLITS=splits, BLOCK_V=4096, WITH_ENT=ent))
                    n += 1
                compile_kernel(tk._combine_kernel, tgt, io, {"inv_alpha"},
                               dict(SPLITS=8, WITH_ENT=ent), num_warps=1)
                bio = dict(z_ptr=dt, t_ptr="i64", lse_ptr="fp32", ent_ptr="fp32", glp_ptr="fp32",
                           glse_ptr="fp32", gtl_ptr="fp32", gent_ptr="fp32", dz_ptr=dt)
                compile_kernel(tk._bwd_kernel, tgt, bio, {"inv_alpha"},
                               dict(HAS_LP=True, HAS_LSE=True, HAS_TL=ent, HAS_ENT=ent, BLOCK_V=4096))
                n += 2
        for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
            common = dict(HAS_BIAS=True, WITH_ENT=True, PRECISION=prec, UPCAST=False, GROUP=16,
                          BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, EVEN_D=dt == "bf16")
            p = dict(h_ptr=dt, w_ptr=dt, b_ptr=dt, t_ptr="i64")
            compile_kernel(lk._fwd_kernel, tgt, dict(p, m_ptr="fp32", s_ptr="fp32", e_ptr="fp32",
                                                      z_ptr="fp32"), {"inv_alpha"}, common)
            bp = dict(p, lse_ptr="fp32", c_ptr="fp32", gh_ptr="fp32", ent_ptr="fp32", tw_ptr="fp32")
            compile_kernel(lk._dz_kernel, tgt, dict(bp, dz_ptr=dt), {"inv_alpha"}, common)
            compile_kernel(lk._bwd_atomic_kernel, tgt,
                           dict(bp, dh_ptr="fp32", dw_ptr="fp32", db_ptr="fp32"), {"inv_alpha"},
                           dict(common, NEED_H=True, NEED_W=True, NEED_B=True))
            n += 3
        print(f"sm_{cc}: ok", flush=True)
    print(f"compiled {n} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
