"""`erm train-srm`: train a sentence-level reward model (`erm.train_sentence_rm`) on preference
pairs, print the held-out accuracy after each epoch and save it to --out; under torchrun
(`torchrun --nproc-per-node N -m erm train-srm ...`) data-parallel with DDP, or FSDP2 with
--fsdp, rank 0 printing and writing."""
import time
from pathlib import Path

from .options import CLIError, check_model_options, json_text, model_options

_DESCRIPTION = ("Train a sentence-level reward model (erm.SentenceRM: value head on sentence "
                "markers, attention/sum/last aggregation) with the Bradley-Terry loss on "
                "preference pairs, print the held-out accuracy after each epoch and save it "
                "to --out (load with erm.SentenceRM.from_pretrained).")


def _add_training_options(p) -> None:
    from ..sentence_rm import AGGREGATES
    p.add_argument("--data", required=True, metavar="FILE",
                   help="training pairs, JSONL ({prompt, chosen, rejected}, RewardBench/TRL "
                        "messages, or HH-RLHF transcripts; .gz read too)")
    p.add_argument("--eval", metavar="FILE", help="held-out pairs: accuracy after each epoch")
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the model")
    p.add_argument("--aggregate", choices=AGGREGATES, default="attention",
                   help="how sentence rewards make the response reward (default: attention)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train only the value head and aggregator (hidden states computed once)")
    p.add_argument("--epochs", type=int, default=1, metavar="N")
    p.add_argument("--lr", type=float, metavar="LR",
                   help="backbone learning rate (1e-5; LoRA adapters: 1e-4)")
    p.add_argument("--head-lr", type=float, metavar="LR",
                   help="head/aggregator learning rate (1e-3 frozen or LoRA, else --lr)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="batches per optimizer step (1)")
    p.add_argument("--weight-decay", type=float, default=0.0, metavar="W", help="AdamW (0)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, metavar="F",
                   help="share of the steps of linear warm-up before the cosine decay (0.1)")
    p.add_argument("--l2-reward", type=float, default=0.0, metavar="W",
                   help="weight of an L2 penalty on R (0)")
    p.add_argument("--attn-dim", type=int, default=256, metavar="D",
                   help="query/key dimension of the attention aggregator (256)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the backbone's activations in the backward")
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (one shard group per decoder "
                        "layer) instead of replicating it with DDP")
    p.add_argument("--save-every", type=int, metavar="N",
                   help="write a checkpoint to OUT/checkpoint every N optimizer steps (and at "
                        "the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint (refused when it was written with another "
                        "model, data or configuration)")
    p.add_argument("--lora-rank", type=int, metavar="R",
                   help="train rank-R LoRA adapters on the backbone (needs peft)")
    p.add_argument("--plot", action="store_true", help="write OUT/curves.png (loss, accuracy)")


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    known = (out / "sentence_rm.json").is_file() or (out / "checkpoint").is_dir()
    if out.is_dir() and any(out.iterdir()) and not known and not resume:
        raise CLIError(f"--out {out}: a non-empty directory that is not a saved SentenceRM")


def _check_run_options(args) -> None:
    for name in ("save_every", "lora_rank"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.lora_rank is not None and args.freeze_backbone:
        raise CLIError("--lora-rank trains adapters on the backbone: not with --freeze-backbone")
    if args.lora_rank is not None:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise CLIError("--lora-rank needs peft (pip install peft)") from None


def _backbone(args, rm):
    """(model, tokenizer) to train from: `rm`'s (a copy unless --freeze-backbone), else
    --model (a name or directory; None: the embedded default) and no tokenizer."""
    import copy

    if rm is None:
        return args.model, None
    model = rm.causal_lm
    return (model if args.freeze_backbone else copy.deepcopy(model)), rm.tokenizer


def cmd_train_srm(args, rm=None) -> int:
    """`erm train-srm`: train, print accuracy per epoch and a JSON summary, save to --out.
    `rm` (an `erm.scoring.Scorer`: its `causal_lm` and `tokenizer`) gives the backbone
    instead of --model (a copy of it is trained unless --freeze-backbone)."""
    from ..data import load_pairs
    from ..train_srm import train_sentence_rm

    from .. import dp

    check_model_options(args)  # e.g. a device this machine does not have
    _check_run_options(args)
    out = Path(args.out)
    _check_out(out, args.resume)
    rank, size, args.device = dp.init(args.device)
    if args.fsdp and size == 1:
        raise CLIError("--fsdp shards the model over the ranks of torchrun: run under "
                       "torchrun --nproc-per-node N (N > 1)")
    train, held = load_pairs(args.data), (load_pairs(args.eval) if args.eval else None)
    model, tok = _backbone(args, rm)
    epochs = []

    def report(e):
        epochs.append(e)
        if rank != 0:
            return
        ev = (f", eval accuracy {100 * e['eval_accuracy']:.1f}% ({len(held)} pairs), eval loss "
              f"{e['eval_loss']:.4f}" if "eval_accuracy" in e else "")
        print(f"epoch {e['epoch']}/{args.epochs}: train loss {e['loss']:.4f}{ev}", flush=True)

    t0 = time.perf_counter()
    srm, history = train_sentence_rm(
        train, model=model, tokenizer=tok, eval_pairs=held, aggregate=args.aggregate,
        freeze_backbone=args.freeze_backbone, epochs=args.epochs, lr=args.lr,
        head_lr=args.head_lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        l2_reward=args.l2_reward, gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, out=out, progress=not getattr(args, "quiet", False),
        device=args.device, on_epoch=report, attn_dim=args.attn_dim,
        max_length=args.max_length, system_prompt=args.system_prompt, fsdp=args.fsdp,
        save_every=args.save_every, resume=args.resume, lora_rank=args.lora_rank,
        plot=args.plot)
    if rank != 0:
        return 0
    last = epochs[-1] if epochs else {}
    print(json_text({"out": str(out), "pairs": len(train), "steps": len(history),
                     "train_loss": last.get("loss"), "eval_accuracy": last.get("eval_accuracy"),
                     "aggregate": args.aggregate, "freeze_backbone": args.freeze_backbone,
                     "ranks": size, "skipped_steps": history[-1]["skipped"] if history else 0,
                     "pairs_per_s": round(sum(h["pairs"] for h in history) / max(
                         1e-9, sum(h["pairs"] / h["pairs_per_s"] for h in history)), 2),
                     "seconds": round(time.perf_counter() - t0, 2)}, "the training summary"))
    return 0


def add_parser(sub) -> None:
    """Register `erm train-srm` on an argparse subparsers object."""
    p = sub.add_parser("train-srm", help="train a sentence-level reward model "
                                         "(erm.SentenceRM) on preference pairs",
                       description=_DESCRIPTION)
    _add_training_options(p)
    model_options(p, ("model", "system_prompt", "device", "batch_size", "max_length"),
                  defaults={"batch_size": 8, "max_length": 2048})
    p.set_defaults(func=cmd_train_srm)
