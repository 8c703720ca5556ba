"""The training loop of `erm.train_sentence_rm` (erm/train_srm.py): one process, or one rank of
a DDP / FSDP2 run (`erm.srm_parallel` says which pairs and batches each rank takes), with the
frozen-backbone cache, sharded evaluation, checkpoints (`erm.srm_checkpoint`) and LoRA.

    t = Trainer(rm, train_pairs, eval_pairs, cfg, progress=True, on_epoch=None)
    t.prepare(train_examples, eval_examples)      # adapters, wrapper, cache, optimizer
    t.checkpointing(folder, save_every, fingerprint=t.fingerprint(identity), resume=False)
    history = t.run(); rm = t.finish(); t.restore_flags()
"""
import copy
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import dp
from . import srm_checkpoint as ckpt
from . import srm_parallel as par
from .sentence_rm import SentenceRM, eval_mode
from .srm_lora import apply_lora

__all__ = ["Trainer", "plot_history"]


def _bt_terms(rc: torch.Tensor, rr: torch.Tensor, l2: float) -> torch.Tensor:
    """(B,) per-pair loss: −log σ(rc − rr) + l2·(rc² + rr²)/2."""
    loss = -F.logsigmoid(rc - rr)
    if l2:
        loss = loss + l2 * 0.5 * (rc.pow(2) + rr.pow(2))
    return loss


def _schedule(opt, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        p = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Trainer:
    """One training run (see the module doc). `cfg`: the run's configuration as
    `train_sentence_rm` records it (aggregate, freeze_backbone, epochs, lr, head_lr, batch_size,
    grad_accum, weight_decay, warmup_ratio, l2_reward, max_grad_norm, gradient_checkpointing,
    seed, world_size, fsdp, lora_rank)."""

    def __init__(self, rm: SentenceRM, train, held, cfg: dict, *, progress: bool = True,
                 on_epoch: Optional[Callable[[dict], None]] = None):
        self.rm, self.train, self.held, self.cfg = rm, train, held, cfg
        self.progress, self.on_epoch = progress, on_epoch
        self.rank, self.size = dp.rank_and_size()
        self.n = len(train)
        self.frozen = bool(cfg["freeze_backbone"])
        self.mode = None if self.size == 1 else ("fsdp" if cfg["fsdp"] else "ddp")
        self.flags = [(p, p.requires_grad) for p in rm.backbone.parameters()]
        self.folder, self.save_every, self.start = None, None, 0
        self.history: List[dict] = []
        self.skipped = 0
        self.keep = None

    # ------------------------------------------------------------------ setup
    def prepare(self, examples: list, held_examples: Optional[list]) -> None:
        """Adapters, trainable flags, the data-parallel wrapper, the cache, the optimizer."""
        rm, cfg = self.rm, self.cfg
        self.owned = par.owned_pairs(self.n, self.rank, self.size)
        if self.frozen:  # R = 0 for every response at the start: the data alone moves it
            with torch.no_grad():
                rm.head.value.weight.zero_()
                rm.head.value.bias.zero_()
        self.examples, self.held_ex = examples, held_examples
        if cfg["lora_rank"] is not None:
            apply_lora(rm, cfg["lora_rank"])
        else:
            rm.backbone.requires_grad_(not self.frozen)
        out_emb = rm.backbone.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not rm.backbone.get_input_embeddings().weight:
            out_emb.weight.requires_grad_(False)  # an untied LM head: not in the forward
        if cfg["gradient_checkpointing"] and not self.frozen and \
                hasattr(rm.backbone, "gradient_checkpointing_enable"):
            rm.backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.fwd = par.SRMForward(rm)
        if self.mode == "fsdp" and self.rank == 0:
            self.keep = copy.deepcopy(rm).cpu()  # the full model rank 0 returns and saves
            self.keep.backbone_name = rm.backbone_name  # a sentinel deepcopy would replace
        self.model = par.wrap(self.fwd, self.mode)
        self.sharded = par.is_sharded(self.model)
        self.opt = self._optimizer()  # the sharded parameters: before a forward unshards them
        self.cache = self.held_cache = None
        nb = par.n_batches(self.n, cfg["batch_size"])
        if self.frozen:
            mine = list(self.owned) + [self.n + i for i in self.owned]
            self.cache = self._cache(examples, mine)
            if held_examples is not None:
                hn = len(held_examples) // 2
                own = dp.shard(hn, self.rank, self.size)
                self.held_cache = self._cache(held_examples,
                                              list(own) + [hn + i for i in own])
        self.steps_per_epoch = math.ceil(nb / cfg["grad_accum"])
        self.total = self.steps_per_epoch * cfg["epochs"]
        self.sched = _schedule(self.opt, self.total,
                               int(round(cfg["warmup_ratio"] * self.total)))
        self.params = [p for g in self.opt.param_groups for p in g["params"]]

    def _optimizer(self):
        cfg, groups = self.cfg, []
        named = list(self.fwd.named_parameters())
        for is_head, rate in ((True, cfg["head_lr"]), (False, cfg["lr"])):
            params = [(n, p) for n, p in named if p.requires_grad and
                      n.startswith("rm.head.") == is_head]
            groups += [{"params": [p for n, p in params if p.dim() >= 2], "lr": rate,
                        "weight_decay": cfg["weight_decay"]},
                       {"params": [p for n, p in params if p.dim() < 2], "lr": rate,
                        "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]])

    @torch.no_grad()
    def _cache(self, examples: list, idx: List[int]) -> Dict[int, torch.Tensor]:
        """Marker states of examples[idx] (this rank's own), one forward per batch."""
        from tqdm.auto import tqdm
        from . import lm

        out = {}
        batches = [[idx[i] for i in b] for b in lm.length_batches(
            [len(examples[i].ids) for i in idx], 2 * self.cfg["batch_size"])]
        run = self.model if self.sharded else self.fwd
        with tqdm(total=len(idx), desc="hidden states", unit="seq", leave=False,
                  disable=not self.progress or self.rank != 0) as bar:
            for b in par.balance(batches, self.sharded):
                states = run(examples=[examples[i] for i in (b or idx[:1])], markers=True)
                for i, s in zip(b or [], states):
                    out[i] = s.to(self.rm.device)
                bar.update(len(b or []))
        if self.sharded:
            self.model.reshard()  # the root keeps its parameters gathered after a forward
        return out

    def fingerprint(self, identity) -> dict:
        """The run's identity a checkpoint records: model, data, eval data, configuration."""
        return {"model": identity, "data": ckpt.data_digest(self.train),
                "eval_data": ckpt.data_digest(self.held) if self.held is not None else None,
                "config": self.cfg}

    def checkpointing(self, folder: Path, save_every: Optional[int], *, fingerprint: dict,
                      resume: bool) -> None:
        """Checkpoints to `folder`; with `resume`, restore the last one when there is one."""
        self.folder, self.save_every, self.fp = folder, save_every, fingerprint
        if resume and ckpt.exists(folder):
            index = ckpt.load(folder, self.fwd, self.opt, self.sched, fingerprint)
            self.start, self.history = int(index["step"]), list(index["history"])
            self.skipped = int(index.get("skipped", 0))

    def restore_flags(self) -> None:
        """A model object passed in keeps its own requires_grad flags (not with LoRA)."""
        if self.cfg["lora_rank"] is None:
            for p, flag in self.flags:
                p.requires_grad_(flag)

    # ------------------------------------------------------------------ the epochs
    def run(self) -> List[dict]:
        """Train from the current step to the end; the history (one dict per step)."""
        from tqdm.auto import tqdm

        cfg, ga = self.cfg, self.cfg["grad_accum"]
        nb = par.n_batches(self.n, cfg["batch_size"])
        counts = par.batch_counts(self.n, self.size, nb)
        step, t0 = self.start, time.perf_counter()
        bar = tqdm(total=self.total, initial=step, desc="train-srm", unit="step",
                   disable=not self.progress or self.rank != 0)
        with bar:
            for epoch in range(step // self.steps_per_epoch + 1, cfg["epochs"] + 1):
                self.rm.head.train()
                self.rm.backbone.train(not self.frozen)
                batches = par.epoch_batches(self.owned, nb, cfg["seed"], epoch, self.rank)
                first = step - (epoch - 1) * self.steps_per_epoch
                for g in range(first, self.steps_per_epoch):
                    js = range(g * ga, min(nb, (g + 1) * ga))
                    rec = self._step([batches[j] for j in js], sum(counts[j] for j in js))
                    step += 1
                    rec.update(step=step, epoch=epoch, skipped=self.skipped,
                               seconds=time.perf_counter() - t0)
                    self.history.append(rec)
                    bar.update(1)
                    bar.set_postfix(loss=rec["loss"], acc=rec["accuracy"],
                                    pairs_s=rec["pairs_per_s"])
                    if g == self.steps_per_epoch - 1:
                        self._end_epoch(epoch, step)
                    if self.save_every and step % self.save_every == 0 and step < self.total:
                        self.save(step)
        if self.folder is not None:
            self.save(step)
        return self.history

    def _end_epoch(self, epoch: int, step: int) -> None:
        summary = {"epoch": epoch, "step": step}
        recs = [h for h in self.history if h["epoch"] == epoch and h.get("loss") is not None]
        n = sum(h["pairs"] for h in recs)
        summary["loss"] = sum(h["loss"] * h["pairs"] for h in recs) / max(1, n)
        if self.held_ex is not None:
            ev = self.evaluate()
            self.history[-1].update(ev)
            summary.update(ev)
        if self.on_epoch is not None:
            self.on_epoch(summary)

    def _rewards(self, run, idx: List[int], examples, cache) -> torch.Tensor:
        """(2·len(idx),) rewards of pairs idx (chosen then rejected) of `examples`."""
        half = len(examples) // 2
        seq = list(idx) + [half + i for i in idx]
        if cache is not None:
            states = [cache[i] for i in seq]
            if self.sharded and torch.is_grad_enabled():
                # inputs that need grad: FSDP2 hooks its post-backward (the reduce-scatter of
                # the head's gradients) onto them when no sharded layer ran
                states = [s.detach().requires_grad_() for s in states]
            return run(states=states)
        return run(examples=[examples[i] for i in seq])

    def _step(self, group: List[List[int]], count: int) -> dict:
        """One optimizer step over this rank's slices of a group of batches."""
        cfg, t0 = self.cfg, time.perf_counter()
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, hits, margin, pairs
        for k, idx in enumerate(group):
            weight = 1.0 if idx else 0.0
            idx = idx or [self.owned[0]]  # an empty slice: a forward of weight 0
            with par.grad_sync(self.model, k == len(group) - 1):
                r = self._rewards(self.model, idx, self.examples, self.cache)
                rc, rr = r[:len(idx)], r[len(idx):]
                terms = _bt_terms(rc, rr, cfg["l2_reward"])
                (terms.sum() * (weight * self.size / count)).backward()
            if weight:
                d = (rc - rr).detach().double()
                sums = [sums[0] + float(terms.detach().sum()),
                        sums[1] + float(((d > 0).double() + 0.5 * (d == 0).double()).sum()),
                        sums[2] + float(d.sum()), sums[3] + len(idx)]
        loss, hits, margin, pairs = dp.all_sum(sums, self.rm.device)
        norm = par.finite_norm(self.params, cfg["max_grad_norm"])
        lr = self.opt.param_groups[0]["lr"]
        ok = math.isfinite(loss) and math.isfinite(norm)
        if ok:
            self.opt.step()
        else:
            self.skipped += 1
        with warnings.catch_warnings():  # a skipped first step: the order warning is moot
            warnings.simplefilter("ignore", UserWarning)
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        secs = max(time.perf_counter() - t0, 1e-9)
        rec = {"loss": loss / pairs, "accuracy": hits / pairs, "margin": margin / pairs,
               "lr": lr, "grad_norm": norm, "pairs": int(pairs), "pairs_per_s": pairs / secs}
        # JSON has no NaN: a skipped step's non-finite values are None
        return {k: v if not isinstance(v, float) or math.isfinite(v) else None
                for k, v in rec.items()}

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Accuracy and BT loss on the eval pairs, each rank scoring its shard."""
        hn = len(self.held_ex) // 2
        own = list(dp.shard(hn, self.rank, self.size))
        bs = self.cfg["batch_size"]
        batches = [own[k:k + bs] for k in range(0, len(own), bs)]
        run = self.model if self.sharded else self.fwd
        sums = [0.0, 0.0, 0.0]
        with eval_mode(self.fwd):
            for b in par.balance(batches, self.sharded):
                if not b:  # a forward other ranks need (FSDP2), on a training pair
                    self._rewards(run, [self.owned[0]], self.examples, self.cache)
                    continue
                r = self._rewards(run, b, self.held_ex, self.held_cache)
                rc, rr = r[:len(b)].double(), r[len(b):].double()
                sums[0] += float(((rc > rr).double() + 0.5 * (rc == rr).double()).sum())
                sums[1] += float(_bt_terms(rc, rr, self.cfg["l2_reward"]).sum())
                sums[2] += len(b)
        if self.sharded:
            self.model.reshard()  # else the next step would run on these gathered weights
        hits, loss, n = dp.all_sum(sums, self.rm.device)
        return {"eval_accuracy": hits / n, "eval_loss": loss / n}

    # ------------------------------------------------------------------ saving
    def save(self, step: int) -> None:
        """A checkpoint of the current state (every rank calls it)."""
        meta = {"step": step, "history": self.history, "skipped": self.skipped,
                "fingerprint": self.fp}
        ckpt.save(self.folder, self.fwd, self.opt, self.sched, meta, sharded=self.sharded)
        dp.barrier()

    def finish(self) -> Optional[SentenceRM]:
        """The trained SentenceRM in eval mode (under FSDP2: gathered on rank 0, None
        elsewhere); with LoRA its backbone is the peft model (`save_pretrained` saves the
        adapters)."""
        rm = self.rm
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict)
            full = get_model_state_dict(self.fwd, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            if self.rank != 0:
                return None
            rm = self.keep
            par.SRMForward(rm).load_state_dict(full)
        if not self.frozen:
            rm.backbone_tuned = True
            if hasattr(rm.backbone, "gradient_checkpointing_disable"):
                rm.backbone.gradient_checkpointing_disable()
        return rm.eval()


def plot_history(history: List[dict], path) -> Path:
    """A PNG of the loss and accuracy per step (and eval accuracy per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [h["loss"] for h in history], label="train")
    ev = [h for h in history if "eval_loss" in h]
    if ev:
        a.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval")
    a.set_xlabel("step")
    a.set_ylabel("Bradley-Terry loss")
    a.legend()
    b.plot(steps, [h["accuracy"] for h in history], label="train (batch)")
    if ev:
        b.plot([h["step"] for h in ev], [h["eval_accuracy"] for h in ev], "o-", label="eval")
    b.set_xlabel("step")
    b.set_ylabel("pair accuracy")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
