"""The configuration of `erm rl` (`erm.rl.RLConfig`): one field per CLI flag, each with its help
in the field's metadata (`erm.cli.rl` builds the argparse from them), every value checked when
the config is built, before any model or file is loaded; and which fields a `--resume` may
change (`RESUME_MAY_CHANGE`)."""
import math
from dataclasses import dataclass, field
from typing import Optional

from . import lm
from ._checks import check_alpha, check_gamma, check_int


def _opt(default, help: str, **kw):
    """A config field with its CLI help."""
    return field(default=default, metadata={"help": help, **kw})


# ============================================================================ config
@dataclass
class RLConfig:
    """Everything a run needs; each field is also a CLI flag (`--prompts-per-step 4`, ...)."""

    model: Optional[str] = _opt(None, "local dir / HF cache name; None: embedded SmolLM2-135M")
    prompts: Optional[str] = _opt(None, ".jsonl {prompt, answer?, split?} or .txt; "
                                        "None: built-in arithmetic")
    system_prompt: Optional[str] = _opt(None, "system message of every prompt")
    steps: int = _opt(10, "RL steps")
    prompts_per_step: int = _opt(2, "prompts per step")
    k: int = _opt(4, "samples per prompt (the group)")
    max_new_tokens: int = _opt(32, "longest sampled response")
    temperature: float = _opt(1.0, "sampling temperature τ")
    alpha: Optional[float] = _opt(None, "log-prob / soft-Q temperature α; None: = temperature")
    gamma: float = _opt(1.0, "discount of the endogenous reward (and reward-to-go)")
    objective: str = _opt("grpo", "advantage estimator", choices=("grpo", "rloo", "reinforce"))
    normalize: bool = _opt(True, "grpo: divide by group std; reinforce: whiten G_t")
    verifiable_weight: float = _opt(0.0, "R = Σ r_t + w·[final number == answer]")
    lr: float = _opt(1e-6, "AdamW learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping (<= 0: none)")
    ppo_epochs: int = _opt(1, "optimizer steps per batch")
    micro_batch: int = _opt(0, "sequences per forward/backward (0: the whole batch)")
    clip_eps: float = _opt(0.2, "PPO clip range ε")
    kl_coef: float = _opt(0.01, "weight of the k3 KL to the reference")
    entropy_coef: float = _opt(0.0, "weight of the entropy bonus")
    seed: int = _opt(0, "seed of sampling and prompt order")
    out: str = _opt("runs/rl", "output folder (log.jsonl, summary.json, checkpoint.json and "
                               "checkpoint-STEP.pt, curves.png)")
    plot: bool = _opt(False, "write out/curves.png")
    eval_prompts: int = _opt(40, "held-back prompts for exact match (0: no eval)")
    eval_max_new_tokens: int = _opt(32, "longest greedy response in the eval")
    save_every: int = _opt(0, "checkpoint every N steps (0: at the end only; <0: never)")
    resume: bool = _opt(False, "continue from the checkpoint in out (checkpoint.json); refused "
                               "when the stored config or the base model differ")
    resume_force: bool = _opt(False, "with --resume: continue even where the stored config or "
                                     "the base model's weights differ (a warning names them)")
    max_bad_steps: int = _opt(3, "abort after this many steps in a row whose loss or gradient "
                                 "was not finite (each is skipped: no update)")
    device: Optional[str] = _opt(None, "None: cuda if available else cpu")
    dtype: Optional[str] = _opt(None, "compute dtype (None: bfloat16 on cuda, float32 on cpu)")
    fsdp: bool = _opt(False, "under torchrun: shard the policy over the ranks with FSDP2 "
                             "(each decoder layer, then the rest) instead of replicating it (DDP)")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self):
        """Check every field, before anything is loaded; resolve `alpha` to the float α (None:
        the sampling temperature)."""
        if self.objective not in ("grpo", "rloo", "reinforce"):
            raise ValueError(f"objective must be grpo, rloo or reinforce, got {self.objective!r}")
        for name, low in (("k", 1), ("prompts_per_step", 1), ("steps", 0), ("ppo_epochs", 1),
                          ("max_new_tokens", 1), ("micro_batch", 0), ("eval_prompts", 0),
                          ("eval_max_new_tokens", 1), ("max_bad_steps", 1), ("seed", 0),
                          ("save_every", -2**63)):
            check_int(getattr(self, name), name, low)
        for name, low in (("temperature", 0), ("lr", 0), ("clip_eps", 0), ("kl_coef", None),
                          ("entropy_coef", None), ("weight_decay", None),
                          ("verifiable_weight", "any"), ("max_grad_norm", "any")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (low == "any" or v > 0 or (low is None and v == 0))):
                what = {"any": "", 0: " > 0", None: " >= 0"}[low]
                raise ValueError(f"{name} must be a finite number{what}, got {v!r}")
        self.alpha = check_alpha(self.alpha if self.alpha is not None else self.temperature,
                                 "alpha (default: the temperature)")
        check_gamma(self.gamma)
        if self.objective in ("grpo", "rloo") and self.k < 2:
            raise ValueError(f"{self.objective} needs k >= 2: with one sample per prompt every "
                             "advantage is 0 and the policy never moves")
        if self.device is not None:
            lm.check_device(self.device)   # a device this machine does not have: a clear error


#: RLConfig fields a `--resume` may change (length, output, memory, placement); any other
#: difference from the checkpoint's config is refused unless `resume_force`.
RESUME_MAY_CHANGE = ("steps", "out", "resume", "resume_force", "progress", "plot", "save_every",
                     "eval_prompts", "eval_max_new_tokens", "device", "fsdp", "micro_batch",
                     "max_bad_steps")
