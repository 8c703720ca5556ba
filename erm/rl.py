"""A slim RL loop on endogenous rewards: rollout → score → advantages → update.

The policy starts as the base model. ONE frozen copy of the base is both the reference model (for
the KL penalty) and the reward model (the endogenous reward of arXiv 2506.23235): a single no-grad
forward of it over prompt + response gives its final hidden states, one fused
`erm.linear_token_stats` pass over them gives the reference log-probs AND the token rewards

    r_t = z_{t−1}[a_t] − γ·α·logsumexp(z_t/α)       (next value 0 after EOS; soft value if cut)

so Σ_t r_t = α·log π_ref(y|x) + V(s_1) (γ = 1, terminated). No full-vocabulary softmax is ever
materialised, neither for the frozen model nor for the policy's log-probs/entropy.

One step (`Trainer.step`):

1. rollout: `prompts_per_step` prompts, `k` samples each, `model.generate` (KV cache), pure
   sampling at `temperature` (top-k/top-p off, so samples follow softmax(z/τ) exactly). A sample
   that emitted EOS is *terminated* (value 0 after it), one cut at `max_new_tokens` is
   *truncated* (the soft value of its last state closes the sum).
2. score: the frozen forward → ref log-probs (B, R) and token rewards (B, R); exact-match of the
   final number against the prompt's answer (if any) → verifiable reward in {0, 1}.
3. advantages (per token, (B, R)): response reward R_i = Σ_t r_t + verifiable_weight·correct_i;
   "grpo": (R_i − mean_group)/(std_group + ε) broadcast over the response; "rloo":
   R_i − mean of the other k−1 samples; "reinforce": dense reward-to-go G_t = Σ_{t'≥t} γ^{t'−t}
   r_t' (verifiable bonus on the last token), whitened over the batch if `normalize`.
4. update: `ppo_epochs` passes over the batch (gradient accumulation over `micro_batch`
   sequences), loss per response token, averaged over all response tokens of the batch:

       −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + kl_coef·k3 − entropy_coef·H,
       ρ = exp(log π_θ − log π_old),  k3 = exp(ref − log π_θ) − (ref − log π_θ) − 1.

   π_old is the rollout policy: its log-probs (temperature α = τ by default, the sampling
   temperature) are those of the first inner epoch's forward, which runs with the rollout
   weights (no update has happened yet), so no extra forward is needed and ρ = 1 exactly there.

The policy is kept in eval mode (no dropout: the ratio and KL are then exact). A step whose loss
or gradient is not finite takes no optimizer step (logged as "skipped"); `max_bad_steps` of them
in a row stop the run (`NonFiniteTraining`). Metrics per step go to `out/log.jsonl` (and a tqdm
bar); `--plot` writes `out/curves.png`; the checkpoint (`erm.checkpoint`: out/checkpoint.json
with the step, config, base-model identity and RNG states, beside checkpoint-STEP.pt with the
policy and optimizer, no pickle) is written atomically and never with non-finite weights, and
`--resume` continues from it to the same state, refusing another config or base model unless
`resume_force`. Exact-match accuracy on the held-back prompts is measured before and after
training (`out/summary.json`).

    erm rl --steps 10 --prompts-per-step 2 --k 4 --max-new-tokens 24 --plot
    from erm.rl import RLConfig, Trainer; Trainer(RLConfig(steps=2)).train()

Around the loop: `erm.rl_config` (RLConfig, every option checked before anything loads),
`erm.dp` (DDP / FSDP2 wrappers, sums over the ranks), `erm.checkpoint` (full checkpoints),
`erm.rl_eval` (exact match), `erm.plots` (curves). Tests: tests/test_rl.py, bench:
benches/bench_rl_step.py.
"""
import copy
import dataclasses
import json
import math
import random
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import checkpoint, dp, jsonio, lm, loading
from .constants import IGNORE_INDEX
from .plots import plot_curves
from .rl_config import RESUME_MAY_CHANGE, RLConfig
from .rl_eval import encode_prompts, exact_match_accuracy
from .tasks import is_correct, load_prompts


class NonFiniteTraining(RuntimeError):
    """`max_bad_steps` steps in a row had a non-finite loss or gradient (none was applied)."""


class RLWarning(UserWarning):
    """A skipped step, a forced resume (`erm rl` shows it as an "erm: warning:" line)."""


# ============================================================================ 1. rollout
def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast("cuda", dtype=dtype, enabled=device.type == "cuda"
                          and dtype in (torch.bfloat16, torch.float16))


@dataclass
class Rollout:
    """One batch of B = prompts × k sampled responses.

    input_ids / attention_mask: (B, P + R) int64, prompt left-padded to P, response after it.
    response_mask: (B, R) bool, True on response tokens (the EOS included, padding after it not).
    terminated: (B,) bool, True where the response ended with EOS.
    answers: per sample, the prompt's answer or None. texts: decoded responses.
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_len: int
    response_mask: Tensor
    terminated: Tensor
    answers: List[Optional[str]]
    texts: List[str]

    @property
    def targets(self) -> Tensor:
        """(B, R) response token ids, IGNORE_INDEX outside the response."""
        r = self.input_ids[:, self.prompt_len:]
        return torch.where(self.response_mask, r, torch.full_like(r, IGNORE_INDEX))


@torch.no_grad()
def rollout(policy, tokenizer, records: Sequence[dict], k: int, *, max_new_tokens: int,
            temperature: float, system_prompt: Optional[str] = None,
            compute_dtype: torch.dtype = torch.float32, sampler=None) -> Rollout:
    """Sample k responses per prompt with `policy.generate` (KV cache, pure sampling at τ);
    `sampler`: the module whose `generate` samples instead (the FSDP wrapper of the policy)."""
    from transformers import GenerationConfig

    dev = next(policy.parameters()).device
    prompts = [r["prompt"] for r in records for _ in range(k)]
    ids, attn = encode_prompts(tokenizer, prompts, system_prompt)
    ids, attn = ids.to(dev), attn.to(dev)
    eos = lm.end_token_ids(policy, tokenizer)
    pad = lm.pad_id(tokenizer, eos)
    gc = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                          max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                          use_cache=True)
    with _autocast(dev, compute_dtype):
        out = (sampler or policy).generate(input_ids=ids, attention_mask=attn,
                                           generation_config=gc)
    p = ids.shape[1]
    resp = out[:, p:]
    if resp.shape[1] == 0:
        raise RuntimeError("generate returned no new tokens")
    is_eos = torch.isin(resp, torch.tensor(eos, device=dev))
    terminated = is_eos.any(1)
    first = torch.where(terminated, is_eos.float().argmax(1), resp.new_full((len(resp),), resp.shape[1] - 1))
    mask = torch.arange(resp.shape[1], device=dev)[None] <= first[:, None]
    resp = torch.where(mask, resp, torch.full_like(resp, pad))
    texts = tokenizer.batch_decode([r[m].tolist() for r, m in zip(resp, mask)],
                                   skip_special_tokens=True)
    return Rollout(input_ids=torch.cat([ids, resp], 1),
                   attention_mask=torch.cat([attn, mask.long()], 1), prompt_len=p,
                   response_mask=mask, terminated=terminated,
                   answers=[r.get("answer") for r in records for _ in range(k)], texts=texts)


# ============================================================================ 2. score
@torch.no_grad()
def score(frozen, batch: Rollout, *, alpha: float, gamma: float = 1.0,
          compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """ONE forward of the frozen base model → (reference log-probs, endogenous token rewards).

    `erm.lm.window_rewards` over the window from the last prompt position p−1 to the end (what
    `EndoRM` scores too), its first index (position p−1, no response token there) dropped.

    Returns:
        ref_logprobs (B, R) float32 (log π_ref,α of each response token, 0 outside the mask) and
        token_rewards (B, R) float32 (r_j = z[a_j] − γ·V(next state), V = 0 after the last token
        of a terminated response; 0 outside the mask).
    """
    b, p = batch.response_mask.shape[0], batch.prompt_len
    mask = torch.cat([batch.response_mask.new_zeros(b, p), batch.response_mask], 1)
    w = lm.window_rewards(frozen, batch.input_ids, batch.attention_mask, mask, batch.terminated,
                          alpha=alpha, gamma=gamma, start=p - 1, compute_dtype=compute_dtype)
    return w.logprobs[:, 1:], w.rewards[:, 1:]


def verifiable_rewards(batch: Rollout) -> Tensor:
    """(B,) float32: 1 where the response's final number equals the prompt's answer."""
    return torch.tensor([float(is_correct(t, a)) for t, a in zip(batch.texts, batch.answers)],
                        device=batch.input_ids.device)


# ============================================================================ 3. advantages
def grpo_advantages(rewards: Tensor, k: int, *, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """(B,) response rewards in groups of k contiguous samples → (B,) (R − mean_g)[/ (std_g + ε)].
    Each group sums to 0."""
    g = rewards.view(-1, k)
    a = g - g.mean(1, keepdim=True)
    if scale and k > 1:
        a = a / (g.std(1, keepdim=True) + eps)
    return a.reshape(-1)


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """(B,) → (B,) R_i − mean_{j≠i} R_j within each group of k (k ≥ 2)."""
    g = rewards.view(-1, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def reward_to_go(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """(B, R) → (B, R) G_t = Σ_{t' ≥ t} γ^{t'−t} r_t' inside the mask, 0 outside."""
    r = token_rewards * response_mask
    out = torch.zeros_like(r)
    acc = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        acc = r[:, t] + gamma * acc
        out[:, t] = acc
    return out * response_mask


def advantages(cfg: RLConfig, token_rewards: Tensor, response_mask: Tensor,
               verifiable: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-token advantages (B, R) float32 for `cfg.objective`, and the (B,) response rewards
    R_i = Σ_t r_t + verifiable_weight·correct_i."""
    m = response_mask.float()
    bonus = cfg.verifiable_weight * verifiable
    resp = (token_rewards * m).sum(1) + bonus
    if cfg.objective == "grpo":
        adv = grpo_advantages(resp, cfg.k, scale=cfg.normalize)[:, None] * m
    elif cfg.objective == "rloo":
        adv = rloo_advantages(resp, cfg.k)[:, None] * m
    else:
        last = response_mask & (response_mask.long().cumsum(1) == response_mask.sum(1, keepdim=True))
        dense = token_rewards + last.float() * bonus[:, None]
        adv = reward_to_go(dense, response_mask, cfg.gamma)
        if cfg.normalize:
            vals = adv[response_mask]
            adv = (adv - vals.mean()) / (vals.std() + 1e-6) * m if vals.numel() > 1 else adv
    return adv, resp


# ============================================================================ 4. update
def policy_logprobs(policy, batch: Rollout, *, alpha: float, entropy: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Policy log-probs (B, R) and entropies (B, R) (float32, with autograd) of the responses.
    `policy` is the model, or its DDP / FSDP wrapper (`erm.dp.wrap_ddp`, `erm.dp.wrap_fsdp`)."""
    args = (batch.input_ids[:, :-1], batch.attention_mask[:, :-1], batch.prompt_len - 1,
            batch.targets)
    if dp.is_data_parallel(policy):  # through the wrapper: its backward reduces the gradients
        st = policy(*args, alpha=alpha, entropy=entropy, compute_dtype=compute_dtype)
    else:
        st = lm.window_token_stats(policy, *args, alpha=alpha, entropy=entropy,
                                   compute_dtype=compute_dtype)
    return st.logprob, st.entropy


def ppo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, adv: Tensor,
             mask: Tensor, *, clip_eps: float, kl_coef: float, entropy_coef: float = 0.0,
             entropy: Optional[Tensor] = None, n_tokens: Optional[int] = None):
    """Clipped surrogate + k3 KL penalty − entropy bonus, summed over masked tokens / n_tokens.

    All tensors (B, R) float32 (mask bool). Returns (loss scalar, dict of float sums for logging:
    "kl", "clip", "ratio", "entropy", "tokens").
    """
    m = mask.float()
    n = float(n_tokens if n_tokens is not None else m.sum().clamp(min=1))
    ratio = torch.exp(logprobs - old_logprobs)
    surr = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    d = ref_logprobs - logprobs
    kl = torch.exp(d) - d - 1
    per_tok = surr + kl_coef * kl
    if entropy is not None and entropy_coef:
        per_tok = per_tok - entropy_coef * entropy
    loss = (per_tok * m).sum() / n
    with torch.no_grad():
        stats = {"kl": float((kl * m).sum()), "ratio": float((ratio * m).sum()),
                 "clip": float((((ratio - 1).abs() > clip_eps).float() * m).sum()),
                 "entropy": float((entropy * m).sum()) if entropy is not None else 0.0,
                 "surrogate": float((surr * m).sum()), "tokens": float(m.sum())}
    return loss, stats


def _slice(batch: Rollout, i: int, j: int) -> Rollout:
    return Rollout(batch.input_ids[i:j], batch.attention_mask[i:j], batch.prompt_len,
                   batch.response_mask[i:j], batch.terminated[i:j],
                   batch.answers[i:j], batch.texts[i:j])


def update(policy, optimizer, batch: Rollout, adv: Tensor, ref_logprobs: Tensor, cfg: RLConfig,
           old_logprobs: Optional[Tensor] = None,
           compute_dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """`cfg.ppo_epochs` optimizer steps on one batch.

    `old_logprobs` (B, R): log π_old of the responses; None takes them from the first epoch's
    forward, which runs with the rollout weights. Returns the metrics of the first epoch (kl,
    entropy, ratio: means over response tokens) and over all epochs (clip fraction, first and
    last loss, grad norm) and "skipped": True when an epoch's loss or gradient was not finite
    (NaN or ±inf): that epoch and the later ones take no optimizer step (the decision is the
    same on every rank: the loss and the norm are global). With `policy` a DDP or FSDP wrapper
    (`erm.dp.wrap_ddp`, `wrap_fsdp`) the batch is this rank's share: the loss is normalised by the response tokens of all ranks
    and scaled by the world size, so the wrapper's mean of the gradients is the gradient of the
    whole batch's loss; the metrics are summed over the ranks."""
    dev = batch.input_ids.device
    parallel = dp.is_data_parallel(policy)
    n_tok = int(max(1.0, dp.all_sum([batch.response_mask.sum()], dev)[0] if parallel
                    else float(batch.response_mask.sum())))
    first, losses, clip, gnorm, skipped = None, [], 0.0, 0.0, False
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        total_loss, tot, logprobs = _backward(policy, batch, adv, ref_logprobs, old_logprobs, cfg,
                                              n_tok, compute_dtype)
        if old_logprobs is None:  # the first epoch ran with the rollout weights: π_old
            old_logprobs = logprobs
        gnorm = torch.nn.utils.clip_grad_norm_(
            [p for p in policy.parameters() if p.requires_grad],
            cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        losses.append(total_loss)
        if epoch == 0:
            first = {key: tot[key] / n_tok for key in ("kl", "entropy", "ratio")}
        if not (math.isfinite(total_loss) and math.isfinite(gnorm)):
            skipped = True  # a non-finite loss or gradient never reaches the weights
            break
        optimizer.step()
        clip += tot["clip"] / n_tok
    optimizer.zero_grad(set_to_none=True)
    return dict(first, clip_frac=clip / cfg.ppo_epochs, loss=losses[0], loss_last=losses[-1],
                grad_norm=gnorm, skipped=skipped)


def _backward(policy, batch: Rollout, adv: Tensor, ref_logprobs: Tensor,
              old_logprobs: Optional[Tensor], cfg: RLConfig, n_tok: int,
              compute_dtype: torch.dtype) -> Tuple[float, Dict[str, float], Tensor]:
    """One epoch's gradients, accumulated over micro-batches of `cfg.micro_batch` sequences
    (under DDP / FSDP reduced over the ranks once, in the last micro-batch's backward);
    `old_logprobs` None: log π_old is this forward's own. Returns (the loss, the `ppo_loss`
    sums (over the ranks when data parallel), this forward's log-probs (B, R) float32, detached)."""
    parallel = dp.is_data_parallel(policy)
    size = dp.rank_and_size()[1] if parallel else 1
    dev, b = batch.input_ids.device, batch.input_ids.shape[0]
    mb = cfg.micro_batch if cfg.micro_batch > 0 else b
    tot, total_loss, parts = {}, 0.0, []
    for i in range(0, b, mb):
        part = _slice(batch, i, i + mb)
        with dp.grad_sync(policy, not parallel or i + mb >= b):
            with _autocast(dev, compute_dtype):
                lp, ent = policy_logprobs(policy, part, alpha=cfg.alpha,
                                          entropy=True, compute_dtype=compute_dtype)
            parts.append(lp.detach())
            old = old_logprobs[i:i + mb] if old_logprobs is not None else parts[-1]
            loss, st = ppo_loss(lp, old, ref_logprobs[i:i + mb], adv[i:i + mb],
                                part.response_mask, clip_eps=cfg.clip_eps,
                                kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef,
                                entropy=ent, n_tokens=n_tok)
            (loss * size if parallel else loss).backward()
        total_loss += float(loss.detach())
        for key, v in st.items():
            tot[key] = tot.get(key, 0.0) + v
    if parallel:
        keys = sorted(tot)
        total_loss, *vals = dp.all_sum([total_loss] + [tot[k] for k in keys], dev)
        tot = dict(zip(keys, vals))
    return total_loss, tot, torch.cat(parts)


# ============================================================================ the loop
class Trainer:
    """The RL loop. `Trainer(cfg).train()` or step by step with `step()`.

    Args:
        cfg: RLConfig.
        model, tokenizer: a transformers causal LM + tokenizer to start from (tests, notebooks);
            None loads `cfg.model` (None: the embedded default model). The model becomes the
            policy (trained in place, float32 master weights); a deep copy of it, frozen, is the
            reference model and the endogenous reward model.
        train_prompts, eval_prompts: prompt records; None reads `cfg.prompts`.

    Under torchrun (or in a process group already initialised) the policy is wrapped in DDP
    (FSDP2 with `cfg.fsdp`); each rank samples and scores whole groups of its share of the
    step's prompts (seeds seed + rank) and of the held-back ones, the metrics are summed over
    the ranks, and rank 0 alone writes the log, the (full) checkpoint and the summary.
    """

    def __init__(self, cfg: RLConfig, model=None, tokenizer=None,
                 train_prompts: Optional[List[dict]] = None,
                 eval_prompts: Optional[List[dict]] = None):
        self.cfg = cfg
        # under torchrun: join the process group (nccl on cuda:LOCAL_RANK, gloo on the CPU)
        self.device, self.dtype = lm.device_and_dtype(dp.init(cfg.device)[2], cfg.dtype)
        self.rank, self.world = dp.rank_and_size()
        if cfg.prompts_per_step < self.world:
            raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be at least the "
                             f"number of ranks ({self.world}): each rank samples whole groups")
        if cfg.fsdp and self.world == 1:
            raise ValueError("fsdp shards the policy over the ranks of a process group: run "
                             "under torchrun with more than one process")
        if model is not None and tokenizer is None:
            raise ValueError("pass the tokenizer with the model")
        if train_prompts is None:  # the prompts and the checkpoint's config before the model
            train_prompts, held = load_prompts(cfg.prompts)
            eval_prompts = held if eval_prompts is None else eval_prompts
        self.train_prompts = list(train_prompts)
        self.eval_prompts = list(eval_prompts or [])[:cfg.eval_prompts]
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.jsonl"
        self.records: List[dict] = []
        meta = checkpoint.read_meta(self.out) if cfg.resume else None
        if meta is not None:
            self._check_resume(meta["config"], dataclasses.asdict(cfg))
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        given = model is not None
        if not given:
            model, tokenizer = lm.load(cfg.model)
        self.tokenizer = tokenizer
        self.policy = model.to(self.device, torch.float32).eval()
        self.policy.requires_grad_(True)
        # the base model's identity: its weight files, or the tensors of a model built in memory
        self.model_id = (checkpoint.tensors_fingerprint(self.policy) if given
                         else loading.weights_fingerprint(cfg.model))
        self.frozen = copy.deepcopy(self.policy).to(self.dtype).eval().requires_grad_(False)
        # the data-parallel wrapper; under FSDP the policy's parameters become shards in place
        self.wrapper = ((dp.wrap_fsdp if cfg.fsdp else dp.wrap_ddp)(self.policy)
                        if self.world > 1 else None)
        self.sampler = self.wrapper if cfg.fsdp else None  # sampling with the gathered weights
        if self.world > 1:
            torch.manual_seed(cfg.seed + self.rank)  # each rank samples its own responses
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters()], lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.step_idx = self.bad_in_row = 0
        if meta is not None:
            self._check_resume({"model_weights": meta.get("model_weights")},
                               {"model_weights": self.model_id})
            self.load(meta)
        elif self.log_path.exists() and self.rank == 0:
            self.log_path.unlink()

    def _check_resume(self, stored: dict, now: dict) -> None:
        """`--resume`: refuse (`erm.checkpoint.CheckpointError`) where the stored `config` or
        model identity differs from this run's (the fields of RESUME_MAY_CHANGE aside), naming
        each difference; with `resume_force` a warning names them instead."""
        diff = loading.differences(stored, now, there="in the checkpoint", skip=RESUME_MAY_CHANGE)
        if not diff:
            return
        msg = (f"--resume: {self.out / checkpoint.META} was written by another run ("
               + "; ".join(diff) + ")")
        if not self.cfg.resume_force:
            raise checkpoint.CheckpointError(msg + ": pass --resume-force to continue from it "
                                             "anyway, or start over without --resume")
        warnings.warn(msg + "; continuing (--resume-force)", RLWarning, stacklevel=3)

    # ---------------------------------------------------------------- prompts of a step
    def prompts_for_step(self, step: int) -> List[dict]:
        """Deterministic in (seed, step): walk a per-epoch shuffle of the training prompts."""
        n, per = len(self.train_prompts), self.cfg.prompts_per_step
        out = []
        for j in range(step * per, (step + 1) * per):
            epoch, i = divmod(j, n)
            order = list(range(n))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.train_prompts[order[i]])
        return out

    def my_prompts(self, step: int) -> List[dict]:
        """This rank's contiguous share of the step's prompts (all of them with one process)."""
        recs = self.prompts_for_step(step)
        mine = dp.shard(len(recs), self.rank, self.world)
        return recs[mine.start:mine.stop]

    # ---------------------------------------------------------------- one RL step
    def step(self) -> dict:
        """rollout → score → advantages → update; returns (and logs) the step's metrics."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        # 1. rollout: k samples of each of this rank's prompts of the step
        batch = rollout(self.policy, self.tokenizer, self.my_prompts(self.step_idx), cfg.k,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        system_prompt=cfg.system_prompt, compute_dtype=self.dtype,
                        sampler=self.sampler)
        t_gen = time.perf_counter() - t0
        # 2. score: one frozen forward → reference log-probs and token rewards; exact match
        ref_lp, tok_r = score(self.frozen, batch, alpha=cfg.alpha, gamma=cfg.gamma,
                              compute_dtype=self.dtype)
        correct = verifiable_rewards(batch)
        # 3. advantages per token, and the response rewards R_i
        adv, resp_r = advantages(cfg, tok_r, batch.response_mask, correct)
        # 4. update: ppo_epochs optimizer steps (through the DDP / FSDP wrapper under torchrun)
        m = update(self.wrapper or self.policy, self.optimizer, batch, adv, ref_lp, cfg,
                   compute_dtype=self.dtype)
        dt = time.perf_counter() - t0
        self.step_idx += 1
        self.bad_in_row = self.bad_in_row + 1 if m["skipped"] else 0
        rec = self._record(batch, tok_r, resp_r, correct, m, dt, t_gen)
        self.records.append(rec)
        if self.rank == 0:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        if m["skipped"]:
            msg = (f"step {self.step_idx}: the loss or the gradient was not finite; no update "
                   f"({self.bad_in_row} such step(s) in a row)")
            if self.bad_in_row >= cfg.max_bad_steps:
                raise NonFiniteTraining(f"{msg}: stopping (--max-bad-steps {cfg.max_bad_steps})"
                                        "; the weights are those of the last good update (try "
                                        "a lower --lr or --max-grad-norm)")
            if self.rank == 0:
                warnings.warn(msg, RLWarning, stacklevel=2)
        return rec

    def _record(self, batch: Rollout, token_rewards: Tensor, response_rewards: Tensor,
                correct: Tensor, m: Dict[str, float], dt: float, t_gen: float) -> dict:
        """The step's log record: the batch's means over all ranks (token_rewards (B, R),
        response_rewards, correct (B,)), the update's metrics `m`, times, memory, a sample."""
        mask, dev = batch.response_mask, self.device
        # batch sums over the ranks: responses, Σr, R, Σ tokens' r, correct, tokens, terminated
        b, sum_r, sum_resp, sum_tok, n_ok, n_resp, n_term = dp.all_sum(
            [len(batch.texts), (token_rewards * mask).sum(), response_rewards.sum(),
             token_rewards.sum(), correct.sum(), mask.sum(), batch.terminated.sum()], dev)
        peak_mb = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
        rec = {"step": self.step_idx,
                "reward": sum_r / b, "reward_total": sum_resp / b,
                "reward_per_token": sum_tok / max(n_resp, 1), "accuracy": n_ok / b,
                "kl": m["kl"], "entropy": m["entropy"], "ratio": m["ratio"],
                "clip_frac": m["clip_frac"], "loss": m["loss"], "grad_norm": m["grad_norm"],
                "response_len": n_resp / b, "terminated": n_term / b,
                "tokens_per_s": n_resp / dt, "step_time_s": dt, "gen_time_s": t_gen,
                "peak_mem_mb": peak_mb, "skipped": m["skipped"], "sample": batch.texts[0][:200]}
        # NaN / ±inf are not JSON: None in the log and the summary
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in rec.items()}

    # ---------------------------------------------------------------- checkpoint / resume
    def save(self) -> Path:
        """Write the checkpoint of this step into out with `erm.checkpoint.save` (the full policy
        and optimizer in checkpoint-STEP.pt; the step, the config, the base model's identity and
        the RNG states in checkpoint.json): atomically, by rank 0 (every rank takes part in
        gathering FSDP's shards first), never with non-finite weights. Returns checkpoint.json."""
        return checkpoint.save(self.out, self.policy, self.optimizer,
                               {"step": self.step_idx, "config": dataclasses.asdict(self.cfg),
                                "model_weights": self.model_id}, sharded=self.cfg.fsdp)

    def load(self, meta: dict) -> None:
        """Restore the checkpoint of out whose checked checkpoint.json is `meta`
        (`erm.checkpoint.read_meta`; with or without FSDP: checkpoints are full); the JSONL log
        is cut back to its step."""
        checkpoint.load(self.out, meta, self.policy, self.optimizer, device=self.device,
                        sharded=self.cfg.fsdp)
        self.step_idx = int(meta["step"])
        if self.world > 1:  # the checkpoint holds rank 0's streams: each rank its own again
            torch.manual_seed(self.cfg.seed + self.rank + 1_000_003 * self.step_idx)
        if self.log_path.exists() and self.rank == 0:
            keep = [json.loads(x) for x in self.log_path.read_text().splitlines() if x.strip()]
            self.records = [r for r in keep if r.get("step", 0) <= self.step_idx]
            self.log_path.write_text("".join(jsonio.dumps(r, "the RL log") + "\n"
                                              for r in self.records))

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> float:
        """Greedy exact match on the held-back prompts (`erm.rl_eval.exact_match_accuracy`: each
        rank decodes a share, the counts are summed over the ranks)."""
        return exact_match_accuracy(self.policy, self.tokenizer, self.eval_prompts, self.device,
                                    max_new_tokens=self.cfg.eval_max_new_tokens,
                                    system_prompt=self.cfg.system_prompt, sampler=self.sampler)

    # ---------------------------------------------------------------- the whole run
    def train(self) -> dict:
        """Eval → `cfg.steps` steps (checkpoints, log, progress bar) → eval, plot, summary.json.
        Returns the summary dict."""
        cfg = self.cfg
        summary = {"config": dataclasses.asdict(cfg)}
        main = self.rank == 0  # log, bar and summary on rank 0
        if self.eval_prompts and self.step_idx == 0:
            summary["accuracy_before"] = self.evaluate()
        bar = None
        if cfg.progress and main:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=min(self.step_idx, cfg.steps), desc="rl",
                       unit="step", dynamic_ncols=True)
        while self.step_idx < cfg.steps:
            rec = self.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: "nan" if rec[k] is None else f"{rec[k]:.3g}"
                                 for k in ("reward", "kl", "accuracy", "response_len")})
            if cfg.save_every > 0 and self.step_idx % cfg.save_every == 0:
                self.save()
        if bar is not None:
            bar.close()
        if cfg.save_every >= 0:
            self.save()
        if self.eval_prompts:
            summary["accuracy_after"] = self.evaluate()
        summary["steps"] = [{k: v for k, v in r.items() if k != "sample"} for r in self.records]
        summary["skipped_steps"] = sum(bool(r.get("skipped")) for r in self.records)
        if cfg.plot and self.records and main:
            summary["plot"] = str(plot_curves(self.records, self.out / "curves.png"))
        if main:
            (self.out / "summary.json").write_text(jsonio.dumps(summary, "the summary", indent=1))
        return summary

