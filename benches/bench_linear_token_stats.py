"""Benchmark erm.linear_token_stats (LM head fused with the token statistics) against its peers.

    python benches/bench_linear_token_stats.py                       # N=8192, D=3584, V=151936 bf16
    python benches/bench_linear_token_stats.py --n 256 --d 256 --v 4096 --reps 20   # small
    python benches/bench_linear_token_stats.py --device cpu --n 16 --d 32 --v 500 --dtype float32 \
        --reps 2 --no-compile                                       # CPU smoke (torch backend)

A GPU script: without CUDA (and without an explicit --device cpu) it prints a message and exits.
Every op starts from hidden (N, D) and the LM-head weight (V, D). erm, torch eager and
torch.compile compute logprob, lse and entropy per token; Liger's LigerFusedLinearCrossEntropyLoss
and cut-cross-entropy's linear_cross_entropy (timed when importable) compute the per-token
cross-entropy only, and are marked so. Backward: Σ_k (out_k · u_k) for random u_k, gradients
w.r.t. hidden and weight.

Floor, measured in the same run: the bare `hidden @ weight.T` matmul (cuBLAS, output in the input
dtype); forward = 1 matmul, forward+backward = 3 matmuls (logits, grad_hidden, grad_weight).
Times: median of --reps runs (≥ 20 on GPU) after warm-up, with torch.cuda.Event timing. Peak
extra memory = torch.cuda.max_memory_allocated during one forward+backward minus what was
allocated before (inputs) and the gradients it returns.
"""
import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    add_common_args, bench_device, bench_meta, peak_extra_mib, report, save_json, sync, time_ms)

import common  # noqa: E402
import erm  # noqa: E402


def eager_stats(h, w, t):
    return common.eager_stats(h @ w.t(), t)


def make_cases(device, with_compile=True):
    cases = {}
    if device.type == "cuda":
        cases["erm (triton)"] = lambda h, w, t: tuple(
            x for x in erm.linear_token_stats(h, w, t, entropy=True, backend="triton")
            if x is not None)
        cases["erm (triton, deterministic=False)"] = lambda h, w, t: tuple(
            x for x in erm.linear_token_stats(h, w, t, entropy=True, backend="triton",
                                              deterministic=False) if x is not None)
    else:
        cases["erm (torch)"] = lambda h, w, t: tuple(
            x for x in erm.linear_token_stats(h, w, t, entropy=True, backend="torch")
            if x is not None)
    cases["torch eager"] = eager_stats
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        cases["liger fused linear CE (CE only)"] = lambda h, w, t: (-flce(w, h, t),)
    except Exception:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy
        cases["cut-cross-entropy (CE only)"] = lambda h, w, t: (
            -linear_cross_entropy(h, w, t, reduction="none"),)
    except Exception:
        pass
    if with_compile:  # last: its first-call compile is the slowest part of a run
        cases["torch.compile"] = torch.compile(eager_stats, dynamic=False)
    return cases


def parser():
    """The command line of this bench (argparse)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, reps=20)
    ap.add_argument("--d", type=int, default=3584)
    ap.add_argument("--warmup", type=int, default=5)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    dev = bench_device(args.device, "bench_linear_token_stats")
    if dev is None:
        return []
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    h = (torch.randn(args.n, args.d, device=dev)).to(dtype)
    w = (torch.randn(args.v, args.d, device=dev) / args.d ** 0.5 * 3).to(dtype)
    t = torch.randint(0, args.v, (args.n,), device=dev)
    u = [torch.randn(args.n, device=dev) for _ in range(3)]

    floor_mm = time_ms(lambda: h @ w.t(), dev, warmup=args.warmup, reps=args.reps)
    floor_f, floor_fb = floor_mm, 3 * floor_mm
    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    meta = bench_meta(dev, n=args.n, d=args.d, v=args.v, dtype=args.dtype, matmul_ms=floor_mm,
                      floor_fwd_ms=floor_f, floor_fwdbwd_ms=floor_fb, torch=torch.__version__,
                      reps=args.reps)
    meta["floors"]["matmul_ms"] = floor_mm
    rows = []
    for name, fn in make_cases(dev, not args.no_compile).items():
        hg = h.clone().requires_grad_(True)
        wg = w.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                fn(h, w, t)

        def fwdbwd():
            outs = fn(hg, wg, t)
            loss = sum((o.float() * ui).sum() for o, ui in zip(outs, u))
            loss.backward()
            hg.grad = None
            wg.grad = None

        try:
            f_ms = time_ms(fwd, dev, warmup=args.warmup, reps=args.reps)
            fb_ms = time_ms(fwdbwd, dev, warmup=args.warmup, reps=args.reps)
            if dev.type == "cuda":
                sync(dev)
                base = torch.cuda.memory_allocated(dev) + grad_bytes

                def keep_grads():  # the returned gradients count as outputs, not as extra
                    outs = fn(hg, wg, t)
                    sum((o.float() * ui).sum() for o, ui in zip(outs, u)).backward()

                mem = peak_extra_mib(keep_grads, dev, base)
                hg.grad = wg.grad = None
            else:
                mem = float("nan")
        except Exception as exc:  # a peer that fails (or runs out of memory) is reported
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append(dict(name=name, fwd_ms=f_ms, fwdbwd_ms=fb_ms, extra_mib=mem))
        if args.json:
            save_json(args.json, meta, rows)
    header = (f"\n{meta['device']}, {meta['date']}, N={args.n}, D={args.d}, V={args.v}, {args.dtype}; "
              f"floor: hidden @ weight.T = {floor_mm:.3f} ms (fwd 1 matmul, fwd+bwd 3 matmuls = "
              f"{floor_fb:.3f} ms); median of {args.reps}")
    report(header, rows, meta, json_path=args.json, plot_path=args.plot,
           title="fused LM head, N={n}, D={d}, V={v}, {dtype}", targets=(1.10, 1.25))
    return rows


if __name__ == "__main__":
    main()
