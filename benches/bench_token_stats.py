"""Benchmark erm.token_stats (forward and forward+backward) against its peers, in one run.

    python benches/bench_token_stats.py                     # N=8192, V=151936, bf16 on the GPU
    python benches/bench_token_stats.py --device cpu --n 256 --v 32000 --dtype float32   # smoke
    python benches/bench_token_stats.py --device cpu --n 2048 --v 49152 --dtype float32 \
        --threads 2 --reps 9                                # the CPU path (torch backend)

Floors, measured in the same run: forward = reading the logits once at the measured copy
bandwidth; forward+backward = three passes over the logits (read, read, write the gradient).
Every op computes logprob, lse and entropy per token; the peers that compute less are timed on
what they do compute and marked so: Liger and quack cross-entropy (no entropy), TRL 1.16's
Triton kernel `trl.kernels.logprob_entropy.selective_log_softmax_and_entropy` (log-prob and
entropy, no lse; on a GPU, or under TRITON_INTERPRET=1). Peers that are not installed are left
out. Median of --reps runs; peak extra memory = torch.cuda.max_memory_allocated during one
forward+backward minus what was allocated before it.

On CPU it also prints the torch backend's forward (with entropy) against one torch.exp pass over
the same logits (out= a preallocated tensor): the cost of touching every logit once with a
transcendental, the natural yardstick of a memory-and-exp-bound CPU op.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    add_common_args, bench_device, bench_meta, copy_bandwidth, eager_stats, peak_extra_mib, report,
    save_json, time_ms)

import erm  # noqa: E402


def make_cases(device, with_compile=True):
    cases = {}
    for b in ("cuda", "triton", "torch"):
        if b == "cuda" and not erm.backends()["cuda"]:
            continue
        if b == "triton" and not erm.backends()["triton"]:
            continue
        if b == "torch" and device.type == "cuda":
            continue  # the chunked torch backend is the CPU path
        cases[f"erm ({b})"] = lambda z, t, b=b: tuple(
            x for x in erm.token_stats(z, t, entropy=True, backend=b) if x is not None)
    cases["torch eager"] = eager_stats
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        ce = LigerCrossEntropyLoss(reduction="none")
        cases["liger cross_entropy (no entropy)"] = lambda z, t: (-ce(z, t),)
    except Exception:
        pass
    trl_kernel = trl_logprob_entropy(device)
    if trl_kernel is not None:
        cases["trl selective_log_softmax_and_entropy (no lse)"] = trl_kernel
    try:
        from quack.cross_entropy import cross_entropy as quack_ce
        if device.type == "cuda":
            cases["quack cross_entropy (no entropy)"] = lambda z, t: (
                -quack_ce(z, t, reduction="none"),)
    except Exception:
        pass
    if with_compile:  # last: its first-call compile is the slowest part of a run
        cases["torch.compile"] = torch.compile(eager_stats, dynamic=False)
    return cases


def trl_logprob_entropy(device):
    """TRL 1.16's own Triton kernel, `selective_log_softmax_and_entropy(logits, index,
    temperature=1.0, row_mask=None) -> (logprobs, entropy)`, when trl is installed and the
    device runs Triton (a GPU, or the interpreter under TRITON_INTERPRET=1); else None."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return None
    try:
        from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy as fn
    except Exception:  # trl's package __init__ needs what a --no-deps install may lack:
        fn = _trl_kernel_file()  # the kernel file itself imports only torch and triton
    return None if fn is None else (lambda z, t: fn(z, t))


def _trl_kernel_file():
    import importlib.util

    try:
        spec = importlib.util.find_spec("trl")  # locates the package without running it
        path = os.path.join(spec.submodule_search_locations[0], "kernels", "logprob_entropy.py")
        kspec = importlib.util.spec_from_file_location("trl_logprob_entropy", path)
        mod = importlib.util.module_from_spec(kspec)
        kspec.loader.exec_module(mod)
        return mod.selective_log_softmax_and_entropy
    except Exception:
        return None


def cpu_report(z, t, reps, with_compile):
    """CPU: erm.token_stats (torch backend, entropy) vs one torch.exp pass (and a compiled
    lse + logprob + entropy, when asked); prints a small table, returns {name: ms}."""
    out = torch.empty_like(z, dtype=torch.float32)
    cases = {"torch.exp pass (out=)": lambda: torch.exp(z, out=out),
             "erm.token_stats (torch, entropy)":
                 lambda: erm.token_stats(z, t, entropy=True, backend="torch"),
             "erm.token_stats (torch)": lambda: erm.token_stats(z, t, backend="torch")}
    if with_compile:
        compiled = torch.compile(eager_stats, dynamic=False)
        cases["torch.compile(lse, logprob, entropy)"] = lambda: compiled(z, t)
    ms = {}
    with torch.no_grad():
        for name, fn in cases.items():
            ms[name] = time_ms(fn, z.device, warmup=2, reps=reps)
    base = ms["torch.exp pass (out=)"]
    print(f"\nCPU, {torch.get_num_threads()} threads, N={z.shape[0]}, V={z.shape[1]}, {z.dtype}; "
          f"median of {reps}")
    print("| op | ms | / exp pass |\n|---|---:|---:|")
    for name, v in ms.items():
        print(f"| {name} | {v:.1f} | {v / base:.2f}x |")
    return ms


def parser():
    """The command line of this bench (argparse)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, reps=50)
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = bench_device(args.device, "bench_token_stats")
    if dev is None:
        return []
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    z = (torch.randn(args.n, args.v, device=dev) * 3).to(dtype)
    t = torch.randint(0, args.v, (args.n,), device=dev)
    w = [torch.randn(args.n, device=dev) for _ in range(3)]
    nbytes = z.numel() * z.element_size()
    bw = copy_bandwidth(dev)
    floor_f = nbytes / bw
    floor_fb = 3 * nbytes / bw
    meta = bench_meta(dev, n=args.n, v=args.v, dtype=args.dtype, copy_gbps=bw / 1e6,
                      floor_fwd_ms=floor_f, floor_fwdbwd_ms=floor_fb, torch=torch.__version__,
                      reps=args.reps)
    meta["floors"]["copy_gbps"] = bw / 1e6
    rows = []
    for name, fn in make_cases(dev, not args.no_compile).items():
        zg = z.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                fn(z, t)

        def fwdbwd():
            outs = fn(zg, t)
            loss = sum((o * wi).sum() for o, wi in zip(outs, w))
            loss.backward()
            zg.grad = None

        try:
            f_ms = time_ms(fwd, dev, reps=args.reps)
            fb_ms = time_ms(fwdbwd, dev, reps=args.reps)
            mem = peak_extra_mib(fwdbwd, dev, torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0)
        except Exception as exc:  # a peer that fails is reported, not fatal
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        rows.append(dict(name=name, fwd_ms=f_ms, fwdbwd_ms=fb_ms, extra_mib=mem))
        if args.json:
            save_json(args.json, meta, rows)
    if dev.type == "cpu":
        meta["cpu_ms"] = cpu_report(z, t, args.reps, not args.no_compile)
    header = (f"\n{meta['device']}, {meta['date']}, N={args.n}, V={args.v}, {args.dtype}; copy "
              f"{meta['copy_gbps']:.0f} GB/s; floors: fwd {floor_f:.3f} ms (read once), fwd+bwd "
          f"{floor_fb:.3f} ms (three passes); median of {args.reps}")
    report(header, rows, meta, json_path=args.json, plot_path=args.plot,
           title="erm.token_stats, N={n}, V={v}, {dtype}", targets=(1.05, 1.15))
    return rows


if __name__ == "__main__":
    main()
