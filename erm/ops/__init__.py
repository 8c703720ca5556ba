"""The ops of erm: one module per op (math in its docstring), kernels in erm.kernels / csrc; what
several ops share is in `erm.ops.core`."""
from .endogenous import endogenous_rewards, next_token_targets, rewards_from_stats, soft_values
from .token_stats import TokenStats, token_logprobs, token_stats
from .linear_token_stats import linear_endogenous_rewards, linear_token_stats
from .entropy import entropy
from .vocab_parallel import (vocab_parallel_endogenous_rewards, vocab_parallel_linear_token_stats,
                             vocab_parallel_token_stats)

__all__ = ["TokenStats", "token_stats", "token_logprobs", "soft_values", "endogenous_rewards",
           "linear_token_stats", "linear_endogenous_rewards", "rewards_from_stats", "next_token_targets",
           "entropy", "vocab_parallel_token_stats", "vocab_parallel_linear_token_stats",
           "vocab_parallel_endogenous_rewards"]
