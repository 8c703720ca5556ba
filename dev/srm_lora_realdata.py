"""A small LoRA-tuned SentenceRM on real HH-RLHF pairs, next to the frozen-backbone heads and the
untrained EndoRM on the same pairs (one seed: a sketch, not a measurement with a spread).

    nice -n 10 .venv/bin/python dev/srm_lora_realdata.py OUT_DIR --cache CACHE_DIR [--train 96]
        [--held 150] [--rank 8] [--epochs 1] [--aggregate attention]

The pairs and the split are those of `dev/srm_realdata.py` (600 pairs, seed 0's split): the first
--train of its 300 training pairs and the first --held of its held-out pairs. The LoRA run is
`erm.train_sentence_rm(lora_rank=R)` on the embedded SmolLM2-135M-Instruct (float32, CPU, batch
8, adapters lr 1e-4, head lr 1e-3), evaluated on the held-out pairs after its epoch; the frozen
heads ("attention", "sum", "last") train on the same pairs from the hidden states
`dev/srm_realdata.py` cached in CACHE_DIR (computing nothing). Writes OUT_DIR/srm_lora.json.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import srm_realdata as base  # noqa: E402


def main(argv=None) -> int:
    """The command line (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--held", type=int, default=150)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--aggregate", default="attention")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, _, _ = base.read_pairs(base.DATA, 600, args.max_length)
    cache = base.cached_pairs(pairs, Path(args.cache), args.max_length, False)
    n = cache["n_pairs"]
    order = list(range(n))
    random.Random(1000).shuffle(order)  # seed 0's split in dev/srm_realdata.py
    tr, held = order[:300][:args.train], order[300:][:args.held]
    res = {"train_pairs": len(tr), "held_out_pairs": len(held), "settings": vars(args),
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    e = cache["endo"]
    res["EndoRM (untrained, sum)"] = float((e[held] > e[[n + i for i in held]]).double().mean())
    hp = argparse.Namespace(head_lr=1e-3, epochs=3)
    for v in ("attention", "sum", "last"):
        head = base.train_head(v, cache, tr, n, hp, 0)
        res[f"frozen, {v} (3 epochs)"] = base.accuracy(head, cache, held, n)
    from erm import train_sentence_rm

    t0 = time.perf_counter()
    as_dict = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                for p in pairs]
    _, hist = train_sentence_rm([as_dict[i] for i in tr], eval_pairs=[as_dict[i] for i in held],
                                aggregate=args.aggregate, lora_rank=args.rank,
                                epochs=args.epochs, batch_size=8, max_length=args.max_length,
                                device="cpu", progress=False, seed=0)
    res[f"LoRA r={args.rank}, {args.aggregate} ({args.epochs} epoch)"] = hist[-1]["eval_accuracy"]
    res["lora_seconds"] = time.perf_counter() - t0
    res["lora_history"] = hist
    (out / "srm_lora.json").write_text(json.dumps(res, indent=1) + "\n")
    for k, v in res.items():
        if isinstance(v, float) and k != "lora_seconds":
            print(f"{k:40s} {100 * v:.1f}%")
    print(f"LoRA training and evaluation: {res['lora_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
