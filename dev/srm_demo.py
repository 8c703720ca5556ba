"""A small measured run of the sentence-level reward model next to EndoRM, on CPU.

    .venv/bin/python dev/srm_demo.py OUT_DIR [--epochs 10] [--batch-size 8] [--head-lr 1e-3]
                                             [--seeds 0 1 2 3 4]

The 64 built-in pairs (erm/data/pairs.jsonl; four subsets interleaved) are split by index: pairs
0–31 train, pairs 32–63 are held out (8 per subset in each half). With the embedded
SmolLM2-135M-Instruct as a frozen backbone, a SentenceRM is trained on the training half for each
aggregate (attention, sum, last) and each seed (the head's initialisation and the shuffling) and
evaluated on the held-out half, next to the training-free EndoRM (sum and mean) on the same
held-out pairs. Writes OUT_DIR/srm_demo.json (accuracies overall and per subset for every seed,
their means, training curves, wall times) and OUT_DIR/srm_demo.png (bars: the means over seeds).

Note: with a shared prompt the hidden state at end_0 is the same for both responses of a pair, so
"sum" (v(end_K) − v(end_0)) and "last" (v(end_K)) have the same Bradley–Terry loss and train to
the same pairwise accuracy; they differ in their scores by a per-prompt constant only.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from erm import EndoRM, lm
    from erm.evaluate import default_data_path, evaluate, load_pairs, plot_report

    t_all = time.perf_counter()
    pairs = load_pairs(default_data_path())
    train, held = pairs[:32], pairs[32:]
    t0 = time.perf_counter()
    model, tok = lm.load(None)
    load_s = time.perf_counter() - t0
    endo = EndoRM(model, tok)
    report = evaluate(endo, held, methods=("endorm_sum", "endorm_mean"), progress=False)
    runs = {}
    for agg in ("attention", "sum", "last"):
        runs[agg] = [_run(agg, seed, train, held, model, tok, args) for seed in args.seeds]
        evs = [r.pop("report") for r in runs[agg]]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        report["methods"][f"srm_{agg}"] = {
            "label": f"SentenceRM ({agg})", "accuracy": mean([e["accuracy"] for e in evs]),
            "subsets": {s: mean([e["subsets"][s] for e in evs]) for s in report["subsets"]},
            "seconds": mean([e["seconds"] for e in evs])}
        accs = [100 * r["held_out_accuracy"] for r in runs[agg]]
        print(f"{agg:9s}: held-out mean {mean(accs):.1f}% over seeds {args.seeds}: "
              + ", ".join(f"{a:.1f}" for a in accs), flush=True)
    for m in ("endorm_sum", "endorm_mean"):
        print(f"{m:11s}: held-out {100 * report['methods'][m]['accuracy']:.1f}%")
    summary = {"data": "erm/data/pairs.jsonl: pairs 0-31 train, 32-63 held out",
               "srm_accuracy": "mean over seeds",
               "model": "SmolLM2-135M-Instruct (embedded), frozen, float32, CPU",
               "settings": vars(args), "torch_threads": torch.get_num_threads(),
               "model_load_seconds": load_s, "runs": runs,
               "held_out": {m: {"label": r["label"], "accuracy": r["accuracy"],
                                "subsets": r["subsets"], "seconds": r["seconds"]}
                            for m, r in report["methods"].items()},
               "total_seconds": time.perf_counter() - t_all}
    (out / "srm_demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_report(report, out / "srm_demo.png",
                title="Held-out accuracy (built-in pairs 32-63), SmolLM2-135M frozen backbone; "
                      f"SentenceRM: mean of {len(args.seeds)} seeds")
    print(f"wrote {out / 'srm_demo.json'} and {out / 'srm_demo.png'} "
          f"({summary['total_seconds']:.0f}s)")
    return 0


def _run(agg, seed, train, held, model, tok, args) -> dict:
    """Train one SentenceRM on the frozen backbone and evaluate it on both halves."""
    from erm import train_sentence_rm
    from erm.evaluate import evaluate

    t0 = time.perf_counter()
    rm, history = train_sentence_rm(train, model=model, tokenizer=tok, eval_pairs=held,
                                    aggregate=agg, freeze_backbone=True, epochs=args.epochs,
                                    batch_size=args.batch_size, head_lr=args.head_lr,
                                    seed=seed, progress=False)
    train_s = time.perf_counter() - t0
    ev = evaluate(None, held, methods=("srm",), srm=rm, progress=False)["methods"]["srm"]
    tr = evaluate(None, train, methods=("srm",), srm=rm, progress=False)["methods"]["srm"]
    return {"seed": seed, "train_seconds": train_s, "held_out_accuracy": ev["accuracy"],
            "held_out_subsets": ev["subsets"], "train_accuracy": tr["accuracy"],
            "eval_accuracy_per_epoch": [h["eval_accuracy"] for h in history
                                        if "eval_accuracy" in h],
            "loss_per_step": [h["loss"] for h in history], "report": ev}


if __name__ == "__main__":
    sys.exit(main())
