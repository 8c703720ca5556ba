"""erm: endogenous reward models from any causal LM, computed with fused kernels.

    import erm
    st = erm.token_stats(logits, targets, temperature=1.0, entropy=True)
    r = erm.endogenous_rewards(logits, input_ids, response_mask=mask)
"""
from .dispatch import backends
from .ops import TokenStats, endogenous_rewards, soft_values, token_logprobs, token_stats
from .ops import linear_endogenous_rewards, linear_token_stats, rewards_from_stats
from .ops import entropy
from .ops import (vocab_parallel_endogenous_rewards, vocab_parallel_linear_token_stats,
                  vocab_parallel_token_stats)
from .model import EndoRM, SentenceReward, TokenRewards
from .sentence_rm import SentenceRM, SentenceScore
from .train_srm import train_sentence_rm

__version__ = "0.1.0"
__all__ = ["EndoRM", "TokenRewards", "SentenceReward", "SentenceRM", "SentenceScore",
           "train_sentence_rm",
           "TokenStats", "token_stats", "token_logprobs", "soft_values", "endogenous_rewards",
           "linear_token_stats", "linear_endogenous_rewards", "rewards_from_stats", "entropy",
           "vocab_parallel_token_stats", "vocab_parallel_linear_token_stats",
           "vocab_parallel_endogenous_rewards",
           "backends", "__version__"]
