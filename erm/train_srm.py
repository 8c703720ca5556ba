"""Training a `SentenceRM` on preference pairs (Bradley–Terry), in one process or data-parallel
under torchrun (DDP, or FSDP2 with `fsdp=True`); the `erm train-srm` command
(erm/cli/train_srm.py) runs it.

    rm, history = erm.train_sentence_rm(pairs, freeze_backbone=True, epochs=3)
    erm train-srm --data train.jsonl --eval eval.jsonl --out srm --freeze-backbone
    torchrun --nproc-per-node 4 -m erm train-srm --data train.jsonl --out srm [--fsdp]

Loss per pair: −log σ(R(x, y_w) − R(x, y_l)) + l2_reward·(R(x, y_w)² + R(x, y_l)²)/2, averaged
over the pairs of an optimizer step (all ranks' pairs); AdamW (no weight decay on biases),
linear warm-up then cosine decay to 0 over the optimizer steps, gradient accumulation over
`grad_accum` batches, gradient-norm clipping, bf16 autocast on GPU, optional gradient
checkpointing of the backbone. Chosen and rejected responses of a batch go through the backbone
in one forward. A step whose loss or gradient norm is not finite is skipped (no update; counted
in the history's "skipped").

With a frozen backbone the value head starts at zero (R = 0 for every response): from its
random initialisation, the random ranking it gives survives a short training on a few hundred
pairs (measured on HH-RLHF pairs: docs/sentence-rm.md). A trained backbone keeps the random
start (through a zero head its first steps would get no gradient); the aggregator's projections
keep their random initialisation.

With `freeze_backbone=True` only the value head and the aggregator train: the hidden states of
the marker tokens of every training (and eval) example are computed once, before the first epoch
(no grad), and the epochs run on them — the backbone is not run again. `lora_rank` trains LoRA
adapters on the backbone (peft) with the head.

Under torchrun (an initialised process group of N > 1 ranks) every rank owns a shard of the
pairs and takes its slice of every batch (`erm.srm_parallel`): one step on N ranks equals one
step of one process on the whole batch; metrics are summed over the ranks, evaluation is sharded,
rank 0 shows the progress and writes the files. With `out`, a checkpoint (`erm.srm_checkpoint`)
is written to OUT/checkpoint every `save_every` steps and at the end; `resume=True` continues
from it.

`history` is one dict per optimizer step: step, epoch, loss, accuracy (of the step's pairs),
margin (mean R_w − R_l), lr, pairs_per_s, skipped (steps skipped so far); the last step of an
epoch also has eval_accuracy and eval_loss when eval pairs are given.
"""
import json
import math
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from . import dp
from ._checks import check_int
from .sentence_rm import AGGREGATES, SentenceRM
from .srm_loop import Trainer

__all__ = ["train_sentence_rm", "as_pairs", "pair_accuracy", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoint"


# ------------------------------------------------------------------------------------ data
def as_pairs(pairs, what: str = "pairs") -> list:
    """Preference pairs as `erm.evaluate.Pair` objects: a list of Pair / {prompt, chosen,
    rejected} dicts (validated by `erm.evaluate.load_pairs`), or a path to a JSONL file.

    Raises:
        TypeError: not a list or path, or items that are neither dicts nor Pairs.
        ValueError (DataError): a malformed or empty pair, naming it; no pairs.
    """
    from .evaluate import Pair, load_pairs

    if isinstance(pairs, (str, os.PathLike)):
        return load_pairs(pairs)
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"{what} must be a list of {{prompt, chosen, rejected}} dicts or Pairs "
                        f"(or a JSONL path), got {type(pairs).__name__}")
    if not pairs:
        raise ValueError(f"{what}: no preference pairs")
    for i, p in enumerate(pairs):
        if not isinstance(p, (dict, Pair)):
            raise TypeError(f"{what}: item {i + 1} must be a dict or an erm.evaluate.Pair, got "
                            f"{type(p).__name__}")
    if all(isinstance(p, Pair) for p in pairs):
        return list(pairs)
    return load_pairs([p if isinstance(p, dict) else {"prompt": p.prompt, "chosen": p.chosen,
                                                      "rejected": p.rejected,
                                                      "subset": p.subset} for p in pairs])


def encode_pairs(rm: SentenceRM, pairs, what: str) -> list:
    """[chosen examples..., rejected examples...] of the pairs, errors naming the pair."""
    prompts = [p.prompt for p in pairs]
    try:
        ch = rm.encode_many(prompts, [p.chosen for p in pairs], what=f"{what}: chosen of pair")
        rj = rm.encode_many(prompts, [p.rejected for p in pairs],
                            what=f"{what}: rejected of pair")
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc)) from None
    return ch + rj


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs with chosen > rejected, a tie counting half."""
    c, r = chosen.double(), rejected.double()
    return float(((c > r).double() + 0.5 * (c == r).double()).mean())


# ------------------------------------------------------------------------------------ model
def _build(model, tokenizer, aggregate, device, kw) -> SentenceRM:
    """A SentenceRM with a fresh head on `model` (None, a path / model id, or an object)."""
    if model is None or isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("tokenizer is given only with a model object (a path or None "
                             "loads its own)")
        return SentenceRM.from_backbone(None if model is None else str(model), device=device,
                                        dtype=torch.float32, aggregate=aggregate, **kw)
    if isinstance(model, SentenceRM):
        raise TypeError("model is already a SentenceRM; pass its backbone (rm.backbone, "
                        "tokenizer=rm.tokenizer) to train a new head")
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer (tokenizer=...)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be None, a path or a transformers model, got "
                        f"{type(model).__name__}")
    return SentenceRM(model, tokenizer, aggregate=aggregate, device=device, **kw)


def _model_identity(model) -> dict:
    """What names the backbone in a checkpoint's fingerprint."""
    from .loading import weights_fingerprint
    from .srm_checkpoint import weights_digest

    if model is None or isinstance(model, (str, os.PathLike)):
        name = None if model is None else str(model)
        return {"name": name, "weights": weights_fingerprint(name)}
    return {"object": type(model).__name__, "weights": weights_digest(model)}


def _check_args(aggregate, epochs, lr, head_lr, batch_size, grad_accum, weight_decay,
                warmup_ratio, l2_reward, max_grad_norm):
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    for name, x in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        check_int(x, name, 1)
    for name, x, low, strict in (("lr", lr, 0.0, True), ("head_lr", head_lr, 0.0, True),
                                 ("weight_decay", weight_decay, 0.0, False),
                                 ("l2_reward", l2_reward, 0.0, False),
                                 ("max_grad_norm", max_grad_norm, 0.0, True)):
        if x is None and name in ("lr", "head_lr", "max_grad_norm"):
            continue
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) \
                or x < low or (strict and x == low):
            raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, "
                             f"got {x!r}")
    if isinstance(warmup_ratio, bool) or not isinstance(warmup_ratio, (int, float)) \
            or not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio!r}")


def _check_run_args(save_every, lora_rank, fsdp, resume, out):
    if save_every is not None:
        check_int(save_every, "save_every", 1)
    if lora_rank is not None:
        check_int(lora_rank, "lora_rank", 1)
    if (save_every is not None or resume) and out is None:
        raise ValueError("save_every and resume need out (the checkpoint goes to OUT/"
                         f"{CHECKPOINT_DIR})")
    if fsdp and dp.rank_and_size()[1] == 1:
        raise ValueError("fsdp needs a process group of more than one rank (run under "
                         "torchrun --nproc-per-node N with N > 1)")


# ------------------------------------------------------------------------------------ training
def train_sentence_rm(pairs, *, model=None, tokenizer=None, eval_pairs=None,
                      aggregate: str = "attention", freeze_backbone: bool = False,
                      epochs: int = 1, lr: Optional[float] = None,
                      head_lr: Optional[float] = None, batch_size: int = 8, grad_accum: int = 1,
                      weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                      l2_reward: float = 0.0, max_grad_norm: Optional[float] = 1.0,
                      gradient_checkpointing: bool = False, seed: int = 0, out=None,
                      progress: bool = True, device=None,
                      on_epoch: Optional[Callable[[dict], None]] = None,
                      fsdp: bool = False, save_every: Optional[int] = None,
                      resume: bool = False, lora_rank: Optional[int] = None,
                      plot: bool = False,
                      **model_kwargs) -> Tuple[Optional[SentenceRM], List[dict]]:
    """Train a sentence-level reward model with the Bradley–Terry loss (see the module doc).

    Args:
        pairs: {prompt, chosen, rejected} dicts (prompt a string or chat messages),
            `erm.evaluate.Pair` objects, or a JSONL path (any format `erm eval` reads).
        model: None (the embedded default model), a local path / cached model id, or a
            transformers causal LM object (then `tokenizer` is required). A model object is
            trained in place unless `freeze_backbone`.
        eval_pairs: pairs to measure accuracy on after each epoch (same forms as `pairs`).
        aggregate: "attention", "sum" or "last".
        freeze_backbone: train only the value head and the aggregator, on hidden states
            computed once per example.
        epochs, batch_size (pairs per batch, all ranks together), grad_accum (batches per
            optimizer step).
        lr: learning rate of the backbone or its LoRA adapters (default 1e-5, 1e-4 with
            LoRA); head_lr: of the head and aggregator (default 1e-3 with a frozen backbone or
            LoRA, else lr).
        weight_decay: AdamW weight decay (not on biases / norms); warmup_ratio: share of the
            optimizer steps of linear warm-up before the cosine decay; l2_reward: weight of the
            L2 penalty on R; max_grad_norm: gradient clipping (None: off).
        gradient_checkpointing: recompute the backbone's activations in the backward.
        seed: seeds the head's initialisation and the shuffling.
        out: directory to save the trained model (`save_pretrained`), history.jsonl, the
            checkpoint (OUT/checkpoint) and, with `plot`, curves.png to (rank 0 writes).
        progress: a tqdm bar (rank 0); on_epoch: called on every rank with a dict
            {epoch, step, loss, eval_accuracy?, ...} after every epoch.
        device: default cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu.
        fsdp: shard the model with FSDP2 instead of replicating it with DDP (under torchrun).
        save_every: write a checkpoint every this many optimizer steps (and at the end).
        resume: continue from OUT/checkpoint when there is one (refused, naming what differs,
            when it was written with another model, data or configuration).
        lora_rank: train rank-R LoRA adapters (peft) on the backbone's linear layers.
        plot: write OUT/curves.png (loss and accuracy per step).
        model_kwargs: further `SentenceRM` arguments (attn_dim, rope, system_prompt,
            max_length, ...).
    Returns:
        (the trained SentenceRM in eval mode — None on ranks other than 0 under FSDP2 —,
        history: one dict per optimizer step, the same on every rank).
    """
    _check_args(aggregate, epochs, lr, head_lr, batch_size, grad_accum, weight_decay,
                warmup_ratio, l2_reward, max_grad_norm)
    _check_run_args(save_every, lora_rank, fsdp, resume, out)
    if freeze_backbone and lora_rank is not None:
        raise ValueError("lora_rank trains the backbone's adapters: not with freeze_backbone")
    train = as_pairs(pairs, "pairs")
    held = as_pairs(eval_pairs, "eval_pairs") if eval_pairs is not None else None
    adapters = lora_rank is not None
    lr = float(lr) if lr is not None else (1e-4 if adapters else 1e-5)
    head_lr = float(head_lr) if head_lr is not None else (
        1e-3 if freeze_backbone or adapters else lr)
    size = dp.rank_and_size()[1]
    if device is None and size > 1 and torch.cuda.is_available():
        device = f"cuda:{dp.torchrun_env()[2]}"
    identity = _model_identity(model) if out is not None else None
    torch.manual_seed(seed)
    rm = _build(model, tokenizer, aggregate, device, model_kwargs)
    cfg = dict(aggregate=aggregate, freeze_backbone=freeze_backbone, epochs=epochs, lr=lr,
               head_lr=head_lr, batch_size=batch_size, grad_accum=grad_accum,
               weight_decay=weight_decay, warmup_ratio=warmup_ratio, l2_reward=l2_reward,
               max_grad_norm=max_grad_norm, gradient_checkpointing=gradient_checkpointing,
               seed=seed, world_size=size, fsdp=bool(fsdp), lora_rank=lora_rank,
               head=rm.config())
    trainer = Trainer(rm, train, held, cfg, progress=progress, on_epoch=on_epoch)
    return _run(trainer, Path(out) if out is not None else None, save_every, resume, identity,
                plot)


def _run(trainer: Trainer, out: Optional[Path], save_every, resume: bool, identity,
         plot: bool) -> Tuple[Optional[SentenceRM], List[dict]]:
    """Prepare, (resume,) train, write (rank 0) and return (model, history)."""
    rm = trainer.rm
    try:
        trainer.prepare(encode_pairs(rm, trainer.train, "pairs"),
                        encode_pairs(rm, trainer.held, "eval_pairs")
                        if trainer.held is not None else None)
        if out is not None:
            trainer.checkpointing(out / CHECKPOINT_DIR, save_every,
                                  fingerprint=trainer.fingerprint(identity), resume=resume)
        history = trainer.run()
        final = trainer.finish()
    finally:
        trainer.restore_flags()
    if out is not None and trainer.rank == 0:
        _write_outputs(final, history, out, plot)
    dp.barrier()
    return final, history


def _write_outputs(rm: SentenceRM, history: List[dict], out: Path, plot: bool) -> None:
    """Rank 0: the model, history.jsonl and (plot) curves.png in `out`."""
    rm.save_pretrained(out)
    with open(out / "history.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    if plot:
        from .srm_loop import plot_history
        plot_history(history, out / "curves.png")
