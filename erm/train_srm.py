"""Training a `SentenceRM` on preference pairs (Bradley–Terry); the `erm train-srm` command
(erm/cli/train_srm.py) runs it.

    rm, history = erm.train_sentence_rm(pairs, freeze_backbone=True, epochs=3)
    erm train-srm --data train.jsonl --eval eval.jsonl --out srm --freeze-backbone

Loss per pair: −log σ(R(x, y_w) − R(x, y_l)) + l2_reward·(R(x, y_w)² + R(x, y_l)²)/2, averaged
over the batch; AdamW (no weight decay on biases), linear warm-up then cosine decay to 0 over the
optimizer steps, gradient accumulation over `grad_accum` batches, gradient-norm clipping, bf16
autocast on GPU, optional gradient checkpointing of the backbone. Chosen and rejected responses
of a batch go through the backbone in one forward.

With `freeze_backbone=True` only the value head and the aggregator train: the hidden states of
the marker tokens of every training (and eval) example are computed once, before the first epoch
(no grad), and the epochs run on them — the backbone is not run again.

`history` is one dict per optimizer step: step, epoch, loss, accuracy (of the batch), margin
(mean R_w − R_l), lr; the last step of an epoch also has eval_accuracy and eval_loss when
eval pairs are given.
"""
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import lm
from ._checks import check_int
from .sentence_rm import AGGREGATES, SentenceRM, eval_mode as _eval_mode

__all__ = ["train_sentence_rm", "as_pairs", "pair_accuracy"]


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


def _encode_pairs(rm: SentenceRM, pairs, what: str):
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


def _optimizer(rm: SentenceRM, lr: float, head_lr: float, weight_decay: float, frozen: bool):
    groups = []
    for params, rate in ((list(rm.head.named_parameters()), head_lr),
                         ([] if frozen else list(rm.backbone.named_parameters()), lr)):
        params = [(n, p) for n, p in params if p.requires_grad]
        decay = [p for n, p in params if p.dim() >= 2]
        rest = [p for n, p in params if p.dim() < 2]
        groups += [{"params": decay, "lr": rate, "weight_decay": weight_decay},
                   {"params": rest, "lr": rate, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _schedule(opt, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        p = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def _cache_states(rm: SentenceRM, examples, batch_size: int, progress: bool) -> list:
    """Marker hidden states of every example (float32 on the head's device), one backbone
    forward per batch of `batch_size` sequences, longest first."""
    from tqdm.auto import tqdm

    out = [None] * len(examples)
    with tqdm(total=len(examples), desc="hidden states", unit="seq", leave=False,
              disable=not progress) as bar, _autocast(rm):
        for idx in lm.length_batches([len(e.ids) for e in examples], batch_size):
            for i, s in zip(idx, rm.marker_states([examples[i] for i in idx])):
                out[i] = s.float().to(rm.device)
            bar.update(len(idx))
    return out


def _autocast(rm: SentenceRM):
    dev = next(rm.backbone.parameters()).device
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def _rewards(rm: SentenceRM, idx: Sequence[int], examples, cache) -> torch.Tensor:
    """(len(idx),) rewards R of examples[idx], from cached states or a backbone forward."""
    if cache is not None:
        return rm.aggregate_states([cache[i] for i in idx])[0]
    with _autocast(rm):
        states = rm.marker_states([examples[i] for i in idx])
    return rm.aggregate_states(states)[0]


def _bt_loss(rc: torch.Tensor, rr: torch.Tensor, l2: float) -> torch.Tensor:
    loss = -F.logsigmoid(rc - rr).mean()
    if l2:
        loss = loss + l2 * 0.5 * (rc.pow(2) + rr.pow(2)).mean()
    return loss


@torch.no_grad()
def _evaluate(rm: SentenceRM, examples, cache, batch_size: int, l2: float) -> Dict[str, float]:
    """Accuracy and BT loss on encoded eval pairs ([chosen..., rejected...])."""
    n = len(examples) // 2
    if cache is not None:
        with _eval_mode(rm):
            scores = torch.cat([_rewards(rm, range(k, min(k + batch_size, 2 * n)), examples,
                                         cache) for k in range(0, 2 * n, batch_size)]).cpu()
    else:
        scores = rm.score_examples(examples, progress=False)
    c, r = scores[:n], scores[n:]
    return {"eval_accuracy": pair_accuracy(c, r), "eval_loss": float(_bt_loss(c, r, l2))}


# ------------------------------------------------------------------------------------ training
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


def train_sentence_rm(pairs, *, model=None, tokenizer=None, eval_pairs=None,
                      aggregate: str = "attention", freeze_backbone: bool = False,
                      epochs: int = 1, lr: Optional[float] = None,
                      head_lr: Optional[float] = None, batch_size: int = 8, grad_accum: int = 1,
                      weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                      l2_reward: float = 0.0, max_grad_norm: Optional[float] = 1.0,
                      gradient_checkpointing: bool = False, seed: int = 0, out=None,
                      progress: bool = True, device=None,
                      on_epoch: Optional[Callable[[dict], None]] = None,
                      **model_kwargs) -> Tuple[SentenceRM, List[dict]]:
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
        epochs, batch_size (pairs per batch), grad_accum (batches per optimizer step).
        lr: learning rate of the backbone (default 1e-5); head_lr: of the head and aggregator
            (default 1e-3 with a frozen backbone, else lr).
        weight_decay: AdamW weight decay (not on biases / norms); warmup_ratio: share of the
            optimizer steps of linear warm-up before the cosine decay; l2_reward: weight of the
            L2 penalty on R; max_grad_norm: gradient clipping (None: off).
        gradient_checkpointing: recompute the backbone's activations in the backward.
        seed: seeds the head's initialisation and the shuffling.
        out: directory to save the trained model (`save_pretrained`) and history.jsonl to.
        progress: a tqdm bar; on_epoch: called with a dict {epoch, loss, eval_accuracy?, ...}
            after every epoch.
        device: default cuda when available, else cpu.
        model_kwargs: further `SentenceRM` arguments (attn_dim, rope, system_prompt,
            max_length, ...).
    Returns:
        (the trained SentenceRM in eval mode, history: one dict per optimizer step).
    """
    _check_args(aggregate, epochs, lr, head_lr, batch_size, grad_accum, weight_decay,
                warmup_ratio, l2_reward, max_grad_norm)
    train = as_pairs(pairs, "pairs")
    held = as_pairs(eval_pairs, "eval_pairs") if eval_pairs is not None else None
    lr = 1e-5 if lr is None else float(lr)
    head_lr = float(head_lr) if head_lr is not None else (1e-3 if freeze_backbone else lr)
    torch.manual_seed(seed)
    rm = _build(model, tokenizer, aggregate, device, model_kwargs)
    examples = _encode_pairs(rm, train, "pairs")
    held_ex = _encode_pairs(rm, held, "eval_pairs") if held is not None else None
    flags = [(p, p.requires_grad) for p in rm.backbone.parameters()]
    rm.backbone.requires_grad_(not freeze_backbone)
    cache = held_cache = None
    if freeze_backbone:
        cache = _cache_states(rm, examples, 2 * batch_size, progress)
        if held_ex is not None:
            held_cache = _cache_states(rm, held_ex, 2 * batch_size, progress)
    elif gradient_checkpointing and hasattr(rm.backbone, "gradient_checkpointing_enable"):
        rm.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = _optimizer(rm, lr, head_lr, weight_decay, freeze_backbone)
    n_batches = math.ceil(len(train) / batch_size)
    total = math.ceil(n_batches / grad_accum) * epochs
    sched = _schedule(opt, total, int(round(warmup_ratio * total)))
    history = _loop(rm, opt, sched, examples, cache, held_ex, held_cache, epochs=epochs,
                    batch_size=batch_size, grad_accum=grad_accum, l2=l2_reward,
                    clip=max_grad_norm, frozen=freeze_backbone, seed=seed, total=total,
                    progress=progress, on_epoch=on_epoch)
    if not freeze_backbone:
        rm.backbone_tuned = True
        if gradient_checkpointing and hasattr(rm.backbone, "gradient_checkpointing_disable"):
            rm.backbone.gradient_checkpointing_disable()
    for p, flag in flags:  # a model object passed in keeps its own flags
        p.requires_grad_(flag)
    rm.eval()
    if out is not None:
        rm.save_pretrained(out)
        with open(Path(out) / "history.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
    return rm, history


def _loop(rm, opt, sched, examples, cache, held_ex, held_cache, *, epochs, batch_size,
          grad_accum, l2, clip, frozen, seed, total, progress, on_epoch) -> List[dict]:
    """The epochs: shuffled batches, BT loss, accumulation, clipping, per-step history."""
    from tqdm.auto import tqdm

    n = len(examples) // 2
    gen = random.Random(seed)
    history: List[dict] = []
    params = [p for g in opt.param_groups for p in g["params"]]
    step, t0 = 0, time.perf_counter()
    with tqdm(total=total, desc="train-srm", unit="step", disable=not progress) as bar:
        for epoch in range(1, epochs + 1):
            rm.head.train()
            rm.backbone.train(not frozen)
            order = list(range(n))
            gen.shuffle(order)
            batches = [order[k:k + batch_size] for k in range(0, n, batch_size)]
            acc = {"loss": 0.0, "hits": 0.0, "margin": 0.0, "count": 0}
            epoch_loss = []
            for j, idx in enumerate(batches):
                r = _rewards(rm, list(idx) + [n + i for i in idx], examples, cache)
                rc, rr = r[:len(idx)], r[len(idx):]
                loss = _bt_loss(rc, rr, l2)
                (loss * len(idx) / _group_size(batches, j, grad_accum)).backward()
                acc["loss"] += float(loss.detach()) * len(idx)
                acc["hits"] += pair_accuracy(rc.detach(), rr.detach()) * len(idx)
                acc["margin"] += float((rc - rr).detach().sum())
                acc["count"] += len(idx)
                if (j + 1) % grad_accum and j + 1 < len(batches):
                    continue
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                lr_now = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                c = acc["count"]
                rec = {"step": step, "epoch": epoch, "loss": acc["loss"] / c,
                       "accuracy": acc["hits"] / c, "margin": acc["margin"] / c, "lr": lr_now,
                       "seconds": time.perf_counter() - t0}
                history.append(rec)
                epoch_loss.append((rec["loss"], c))
                acc = {"loss": 0.0, "hits": 0.0, "margin": 0.0, "count": 0}
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", epoch=epoch)
            summary = {"epoch": epoch, "step": step,
                       "loss": sum(a * b for a, b in epoch_loss) / max(1, sum(b for _, b in
                                                                            epoch_loss))}
            if held_ex is not None:
                ev = _evaluate(rm, held_ex, held_cache, 2 * batch_size, l2)
                history[-1].update(ev)
                summary.update(ev)
            if on_epoch is not None:
                on_epoch(summary)
    return history


def _group_size(batches, j: int, grad_accum: int) -> int:
    """Pairs in the accumulation group of batch j (the last group may be short)."""
    start = (j // grad_accum) * grad_accum
    return sum(len(b) for b in batches[start:start + grad_accum])
