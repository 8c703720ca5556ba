"""End-to-end EndoRM scoring: `EndoRM.score` on (prompt, response) strings with a random model.

One row per way of computing the rewards from the model body: the fused LM-head op
(`erm.linear_token_stats` on the final hidden states, what EndoRM does by default for a plain
head) and the full logits (`EndoRM.fused = False`). Each row's time covers the whole call:
templating and tokenising, length bucketing, the forward, the rewards, the copy to the CPU.

Default shape: Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864,
vocabulary 151936, tied embeddings), random weights in bf16; 16 pairs of about 1024 tokens
(16k tokens) in batches of 16. The text comes from a small tokenizer trained in memory (so its
ids use the first ~400 entries of the vocabulary: the head still computes all 151936 logits).

    python benches/bench_score.py                                  # on a CUDA GPU
    python benches/bench_score.py --device cpu --dtype float32 --layers 1 --hidden 32 --heads 4 \
        --intermediate 64 --vocab 500 --pairs 2 --seq 64 --reps 1  # smoke run

Peak extra memory: torch.cuda.max_memory_allocated during one call minus what was allocated
before it (the model). Prints a markdown table; --json writes {meta, rows}.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # erm from this checkout
sys.path.insert(0, HERE)                    # benches/common.py
from common import (  # noqa: E402
    CORPUS, add_model_args, bench_device, bench_meta, peak_extra_mib, random_causal_lm, save_json,
    small_tokenizer, time_ms)


def parser():
    """The command line of this bench (argparse)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=16, help="pairs scored per call (default 16)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per pair, about (default 1024)")
    p.add_argument("--batch-size", type=int, default=16)
    add_model_args(p)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="cuda (default) or cpu for a smoke run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", help="also write {meta, rows} here")
    return p


def make_pairs(rm, n, seq):
    """n (prompt, response) pairs whose encoding by `rm` is at most `seq` tokens each (as many
    words of the built-in sentences, repeated, as fit; at least one)."""
    import itertools

    prompt = CORPUS[0].split("?")[0] + "?"
    words = " ".join(CORPUS[1:]).split()

    def response(k, i=n):
        return f"{i}. " + " ".join(itertools.islice(itertools.cycle(words), k))

    def fits(k):
        return len(rm.encode(prompt, response(k)).ids) <= seq

    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # the longest response that fits: lo fits (or is 1), hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return [prompt] * n, [response(lo, i) for i in range(n)]


def main(argv=None):
    args = parser().parse_args(argv)
    dev = bench_device(args.device, "bench_score")
    if dev is None:
        return []
    import erm

    dtype = getattr(torch, args.dtype)
    tok = small_tokenizer()
    model = random_causal_lm("qwen2", vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                             heads=args.heads, kv_heads=args.kv_heads,
                             intermediate=args.intermediate, max_positions=4 * args.seq,
                             device=dev).to(dtype)
    rm = erm.EndoRM(model, tok, batch_size=args.batch_size, max_length=4 * args.seq)
    prompts, responses = make_pairs(rm, args.pairs, args.seq)
    tokens = sum(len(rm.encode(p, r).ids) for p, r in zip(prompts, responses))
    rows, scores = [], {}
    for name, fused in (("EndoRM.score (fused LM head)", None), ("EndoRM.score (logits)", False)):
        rm.fused = fused

        def call():
            scores[name] = rm.score(prompts, responses, progress=False)

        ms = time_ms(call, dev, warmup=1, reps=args.reps)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        rows.append(dict(name=name, ms=ms, tok_s=tokens / ms * 1e3,
                         extra_mib=peak_extra_mib(call, dev, base)))
    a, b = scores.values()
    diff = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
    meta = bench_meta(dev, pairs=args.pairs, tokens=tokens, batch_size=args.batch_size,
                      layers=args.layers, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                      reps=args.reps, max_rel_diff=diff)
    print(f"\nEndoRM.score end to end, {meta['device']}, {meta['date']}: {args.pairs} pairs, "
          f"{tokens} tokens, Qwen2-shape hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}, {args.dtype}; median of {args.reps}")
    print("| path | ms per call | tokens/s | peak extra MiB |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['ms']:.1f} | {r['tok_s']:.0f} | {r['extra_mib']:.0f} |")
    print(f"max relative difference of the rewards, fused vs logits: {diff:.2e}")
    if args.json:
        save_json(args.json, meta, rows)
    return rows


if __name__ == "__main__":
    main()
