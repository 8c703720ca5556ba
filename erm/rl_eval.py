"""Exact-match evaluation of an RL policy, and the prompt encoding it shares with the rollout.

`encode_prompts` renders prompt records as the model's context, LEFT-padded so every response
starts at the same column (`erm.rl.rollout` samples from it too); `exact_matches` decodes
greedily and compares each response's final number with the record's answer
(`erm.tasks.is_correct`); `exact_match_accuracy` does so with each rank of a process group
decoding its share of the records (`erm.rl.Trainer.evaluate`).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import dp, lm
from .tasks import is_correct


def encode_prompts(tokenizer, prompts: Sequence, system_prompt: Optional[str] = None,
                   pad_id: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Render prompts as the model's context (`erm.lm.context_ids`) and LEFT-pad them, so every
    response starts at the same column.

    Returns:
        input_ids (B, P) int64 and attention_mask (B, P) int64, on the CPU.
    """
    seqs = [lm.context_ids(tokenizer, lm.messages(p, system_prompt)) for p in prompts]
    ids, attn, _ = lm.pad(seqs, lm.pad_id(tokenizer) if pad_id is None else pad_id, side="left")
    return ids, attn


@torch.no_grad()
def exact_matches(policy, tokenizer, prompts: Sequence[dict], *, max_new_tokens: int = 32,
                  batch_size: int = 16, system_prompt: Optional[str] = None,
                  sampler=None) -> List[bool]:
    """Whether the final number of each greedy response equals its record's "answer".

    Args:
        prompts: records {"prompt": str or chat, "answer": str}.
        sampler: the module whose `generate` decodes instead of `policy` (the FSDP wrapper).
    Returns:
        one bool per prompt.
    """
    from transformers import GenerationConfig

    dev = next(policy.parameters()).device
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=lm.end_token_ids(policy, tokenizer),
                          pad_token_id=lm.pad_id(tokenizer))
    texts = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, attn = encode_prompts(tokenizer, [r["prompt"] for r in chunk], system_prompt)
        out = (sampler or policy).generate(input_ids=ids.to(dev), attention_mask=attn.to(dev),
                                           generation_config=gc)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [is_correct(t, r.get("answer")) for t, r in zip(texts, prompts)]


def exact_match_accuracy(policy, tokenizer, prompts: Sequence[dict], device, *,
                         max_new_tokens: int = 32, system_prompt: Optional[str] = None,
                         sampler=None) -> float:
    """The fraction of `prompts` whose greedy response is an exact match (`exact_matches`), NaN
    for none. In a process group each rank decodes a contiguous share, padded to the same number
    of batches (a sharded policy decodes in step on all ranks), and the counts are summed over
    the ranks on `device`."""
    rank, size = dp.rank_and_size()
    n = len(prompts)
    share = dp.shard(n, rank, size)
    mine = list(prompts[share.start:share.stop])
    padded = mine + [prompts[0]] * (-(-n // size) - len(mine)) if n else []
    hits = exact_matches(policy, tokenizer, padded, sampler=sampler,
                         max_new_tokens=max_new_tokens, system_prompt=system_prompt)[:len(mine)]
    ok, total = dp.all_sum([sum(hits), len(hits)], device)
    return ok / total if total else float("nan")
