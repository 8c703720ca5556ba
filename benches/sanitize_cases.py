"""One small shape per GPU kernel, forward and backward, for compute-sanitizer (memcheck and
racecheck).

    compute-sanitizer --tool memcheck python benches/sanitize_cases.py        # every case
    python benches/sanitize_cases.py --cases split --backends cuda            # one case
    TRITON_INTERPRET=1 python benches/sanitize_cases.py --device cpu --backends triton   # on CPU

Cases (kernels launched):
* `token_stats`: N=64, V=1000 (one vocabulary split): the forward and backward kernels;
* `split`: N=4, V=32003 (odd V, several splits per row): the split forward and the combine;
* `linear`: the fused LM head at N=64, D=128, V=1000 (bias, entropy): its forward, the
  deterministic backward's dz kernel and the atomic backward kernel (Triton only).
All in bf16 with entropy and every upstream gradient; each result is compared with the float64
torch backend (loose bf16 tolerances) so that a kernel writing garbage also fails. Exit status 0
when every case ran and matched. Run it with ERM_AUTOTUNE=pinned (kernels/autotune.py) so that
no autotuning runs under the sanitizer.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = ("token_stats", "split", "linear")


def parser():
    """The command line of this script (argparse)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--backends", default="triton,cuda",
                   help="comma list of triton, cuda (token_stats / split; linear is Triton)")
    p.add_argument("--device", default="cuda")
    return p


def _close(name, got, ref, tol):
    got, ref = got.detach().double(), ref.detach().double()
    err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1))
    ok = err <= tol
    print(f"{name}: max error {err:.2e} (tolerance {tol:.0e}) {'ok' if ok else 'MISMATCH'}")
    return ok


def token_stats_case(name, n, v, backend, dev):
    """Forward + backward of erm.token_stats (entropy, four upstream weights) vs float64 torch."""
    import erm

    g = torch.Generator(device="cpu").manual_seed(v)
    z = (torch.randn(n, v, generator=g) * 4).to(dev, torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g).to(dev)
    t[::5] = -100
    w = [torch.randn(n, generator=g, dtype=torch.float64).to(dev) for _ in range(4)]
    outs, grads = [], []
    for zz, b in ((z, backend), (z.double(), "torch")):
        zz = zz.detach().clone().requires_grad_(True)
        st = erm.token_stats(zz, t, temperature=0.7, entropy=True, backend=b)
        sum((o.double() * wk).sum() for o, wk in zip(st, w)).backward()
        outs.append(st)
        grads.append(zz.grad)
    ok = all(_close(f"{name} {backend} {k}", a, r, 1e-4)
             for k, a, r in zip(outs[0]._fields, outs[0], outs[1]))
    return _close(f"{name} {backend} grad", grads[0], grads[1], 2e-2) and ok


def linear_case(dev, deterministic):
    """Forward + backward of erm.linear_token_stats (Triton) vs float64 torch."""
    import erm

    g = torch.Generator(device="cpu").manual_seed(3)
    n, d, v = 64, 128, 1000
    h = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
    wt = (torch.randn(v, d, generator=g) / d ** 0.5 * 3).to(dev, torch.bfloat16)
    b = torch.randn(v, generator=g).to(dev, torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g).to(dev)
    u = [torch.randn(n, generator=g, dtype=torch.float64).to(dev) for _ in range(4)]
    res = []
    for dt, be in ((torch.bfloat16, "triton"), (torch.float64, "torch")):
        xs = [x.detach().to(dt).clone().requires_grad_(True) for x in (h, wt, b)]
        st = erm.linear_token_stats(xs[0], xs[1], t, bias=xs[2], temperature=0.7, entropy=True,
                                    backend=be, deterministic=deterministic)
        sum((o.double() * uk).sum() for o, uk in zip(st, u)).backward()
        res.append((st, [x.grad for x in xs]))
    tag = f"linear deterministic={deterministic}"
    (st, grads), (st64, grads64) = res
    ok = all(_close(f"{tag} {k}", a, r, 1e-2) for k, a, r in zip(st._fields, st, st64))
    return all([_close(f"{tag} grad_{k}", a, r, 5e-2)
                for k, a, r in zip(("hidden", "weight", "bias"), grads, grads64)]) and ok


def main(argv=None):
    args = parser().parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    backends = [b for b in args.backends.split(",") if b]
    bad = sorted(set(cases) - set(CASES)) + sorted(set(backends) - {"triton", "cuda"})
    if bad:
        raise SystemExit(f"sanitize_cases: unknown case or backend: {', '.join(bad)}")
    import erm

    dev = torch.device(args.device)
    have = erm.backends()
    ok = True
    for b in backends:
        if not have.get(b):
            print(f"backend {b}: not available here, skipped")
            continue
        if "token_stats" in cases:
            ok &= token_stats_case("token_stats N=64 V=1000", 64, 1000, b, dev)
        if "split" in cases:
            ok &= token_stats_case("split N=4 V=32003", 4, 32003, b, dev)
    if "linear" in cases and have.get("triton"):
        for det in (True, False):
            ok &= linear_case(dev, det)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("all cases matched" if ok else "MISMATCH in at least one case")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
