"""Step time and peak memory of one RL policy update: fused LM-head token stats vs plain logits.

One update = forward of the policy over B×T tokens, per-token log-probs + entropy at temperature
α, the erm.rl loss (PPO-clip surrogate + k3 KL to fixed reference log-probs − entropy bonus),
backward. Two ways to get the log-probs and entropies:

* fused: final hidden states (B, T, D) → `erm.linear_token_stats(hidden, lm_head.weight, ...)`:
  no (B, T, V) logits tensor, forward or backward (what erm.rl does);
* plain: `model(ids).logits` (B, T, V) → float32 → log_softmax → gather, entropy = −Σ p·log p
  (what a straightforward RL loop does).

Default shape: Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864,
vocab 151936, tied embeddings), random weights in bf16, a batch of 8×1024 tokens.

    python benches/bench_rl_step.py                       # on a CUDA GPU
    python benches/bench_rl_step.py --device cpu --dtype float32 --batch 2 --seq 512
    python benches/bench_rl_step.py --layers 2 --batch 2 --seq 256    # smoke run

On a GPU memory is torch's peak allocated memory; on CPU it is the process's peak resident set
size (VmHWM, reset through /proc/self/clear_refs before the timed steps), which also counts what
the allocator keeps cached, so treat CPU memory numbers as upper bounds; each path then runs in
its own process (`--no-isolate` to turn that off).

Prints a markdown table (median step time, peak memory allocated, tokens/s) and the relative
difference of the two losses.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # erm from this checkout
sys.path.insert(0, HERE)                    # benches/common.py
from common import add_model_args, proc_kib, reset_peak_rss, time_ms  # noqa: E402


def build_model(args, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      intermediate_size=args.intermediate, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=True,
                      rope_theta=1e6)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).train()


def fused_stats(model, ids, alpha):
    import erm

    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    st = erm.linear_token_stats(hidden, model.get_output_embeddings().weight, ids[:, 1:],
                                temperature=alpha, entropy=True)
    return st.logprob, st.entropy


def plain_stats(model, ids, alpha):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float() / alpha
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


PATHS = (("fused (erm.linear_token_stats)", fused_stats),
         ("plain (logits → log_softmax)", plain_stats))


def run_isolated(args, argv):
    """CPU: each path in a fresh process, so that one path's peak resident memory does not
    include what the other left cached."""
    import json
    import subprocess
    import tempfile

    rows, losses = [], {}
    for name, _ in PATHS:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--path",
                            name.split()[0], "--json", out, "--quiet"], check=True)
            with open(out) as f:
                got = json.load(f)
        rows += got["rows"]
        losses.update(got["losses"])
    return rows, losses


def run(args):
    from erm.rl import ppo_loss

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    b, t = args.batch, args.seq
    ids = torch.randint(0, args.vocab, (b, t), generator=g).to(device)
    ref = (-torch.rand(b, t - 1, generator=g) * 8).to(device)     # fixed reference log-probs
    adv = torch.randn(b, t - 1, generator=g).to(device)
    mask = torch.ones(b, t - 1, dtype=torch.bool, device=device)
    mask[:, : t // 4] = False                                       # the prompt part
    rows, losses = [], {}
    for name, fn in PATHS:
        if args.path != "both" and not name.startswith(args.path):
            continue
        def step():
            model.zero_grad(set_to_none=False)
            lp, ent = fn(model, ids, args.alpha)
            loss, _ = ppo_loss(lp, lp.detach(), ref, adv, mask, clip_eps=0.2, kl_coef=0.01,
                               entropy_coef=0.01, entropy=ent)
            loss.backward()
            return loss
        try:
            for _ in range(args.warmup):
                losses[name] = float(step().detach())
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:  # CPU: peak resident set size of the process over the timed steps
                cpu_peak_ok = reset_peak_rss()
                base = proc_kib("VmRSS")
            ms = time_ms(step, device, warmup=0, reps=args.reps)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() / 2**30
                extra = (torch.cuda.max_memory_allocated() - base) / 2**30
            elif cpu_peak_ok and base is not None:
                hwm = proc_kib("VmHWM")
                peak, extra = hwm / 2**20, (hwm - base) / 2**20
            else:
                peak = extra = float("nan")
            rows.append({"name": name, "ms": ms, "peak_gib": peak, "extra_gib": extra,
                         "tok_s": b * t / ms * 1e3})
        except torch.OutOfMemoryError:
            rows.append({"name": name, "ms": float("nan"), "peak_gib": float("nan"),
                         "extra_gib": float("nan"), "tok_s": float("nan"), "oom": True})
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, losses


def parser():
    """The command line of this bench (argparse)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    add_model_args(p)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda",
                   help="cuda (default) or cpu (memory is then the process's peak resident set "
                        "size over the timed steps, from /proc)")
    p.add_argument("--path", default="both", choices=["both", "fused", "plain"])
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each path in its own process (default: on CPU)")
    p.add_argument("--json", help="also write the rows and losses to this file")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_rl_step: needs a CUDA GPU (none found); nothing measured. "
              "(--device cpu runs a smoke test of the script.)")
        return []
    isolate = args.isolate if args.isolate is not None else args.device == "cpu"
    if isolate and args.path == "both":
        rows, losses = run_isolated(args, argv)
    else:
        rows, losses = run(args)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"rows": rows, "losses": losses}, f)
    if args.quiet:
        return rows
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\nOne policy update (fwd+bwd of log-probs + entropy + k3 KL + PPO-clip), "
          f"{args.batch}×{args.seq} tokens, Qwen2-shape hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, {args.dtype}, {dev}\n")
    print("| path | step ms | peak mem GiB | peak above model+grads GiB | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['name']} | OOM | | | |")
        else:
            print(f"| {r['name']} | {r['ms']:.1f} | {r['peak_gib']:.2f} | {r['extra_gib']:.2f} | "
                  f"{r['tok_s']:.0f} |")
    if len(losses) == 2:
        a, b = losses.values()
        print(f"\nloss fused {a:.6f} vs plain {b:.6f} (rel. diff {abs(a - b) / max(abs(b), 1e-12):.2e})")
    return rows


if __name__ == "__main__":
    main()
