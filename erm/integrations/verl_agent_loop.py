"""Dense rewards through verl's agent loop: `DenseAgentLoopManager` (verl's V0 trainer,
`trainer.use_v1=False`, with `actor_rollout_ref.rollout.agent.agent_loop_manager_class` set to
`erm.integrations.verl.DenseAgentLoopManager`).

verl 0.9.1's agent-loop worker asks a reward worker for each finished trajectory's reward and
puts that one number on the trajectory's last response token. With erm's reward manager in dense
mode the reward worker answers a list of per-token rewards; `DenseAgentLoopWorker` carries the
list in the trajectory's extra fields (the reward becomes its sum meanwhile, so every verl code
path in between sees a number) and, when the batch is assembled, writes the per-token rewards
into `rm_scores` on the valid response tokens. This module imports verl and ray.
"""
from typing import List

import ray
from verl.experimental.agent_loop.agent_loop import AgentLoopManager, AgentLoopWorker

from .verl import DENSE_KEY, dense_scores, token_positions

__all__ = ["DenseAgentLoopWorker", "DenseAgentLoopManager", "dense_rm_scores"]


class DenseAgentLoopWorker(AgentLoopWorker):
    """verl's `AgentLoopWorker`, writing per-token rewards (a reward worker's list answer) into
    `rm_scores` instead of one number on the last token."""

    async def _compute_score(self, outputs: List, kwargs: dict) -> None:
        await super()._compute_score(outputs, kwargs=kwargs)
        final = outputs[-1]
        if isinstance(final.reward_score, (list, tuple)):
            (total,), (per_token,) = dense_scores([final.reward_score])
            final.extra_fields[DENSE_KEY] = per_token
            final.reward_score = total

    def _postprocess(self, inputs, *args, **kwargs):
        """verl's batch, with each trajectory's per-token rewards on its valid response tokens
        of `rm_scores` (B, response_length) float32 (rows without them as verl made them)."""
        out = super()._postprocess(inputs, *args, **kwargs)
        dense = out.non_tensor_batch.pop(DENSE_KEY, None)
        if dense is None or "rm_scores" not in out.batch.keys():
            return out
        return dense_rm_scores(out, list(dense))


def dense_rm_scores(out, dense: list):
    """`out` (an agent-loop DataProto with prompts, responses, attention_mask and rm_scores) with
    rm_scores row i replaced by dense[i] on its valid response tokens where dense[i] is a list of
    that many numbers; returns `out`."""
    rm = out.batch["rm_scores"]
    p = out.batch["prompts"].size(1)
    lengths = out.batch["attention_mask"][:, p:].sum(dim=-1).tolist()
    rows = [i for i, d in enumerate(dense)
            if isinstance(d, (list, tuple)) and len(d) == int(lengths[i]) and len(d) > 0]
    if rows:
        placed = token_positions([dense[i] for i in rows], [lengths[i] for i in rows],
                                 rm.size(1)).to(device=rm.device, dtype=rm.dtype)
        rm = rm.clone()
        rm[rows] = placed
        out.batch["rm_scores"] = rm
    return out


class DenseAgentLoopManager(AgentLoopManager):
    """verl's `AgentLoopManager` with `DenseAgentLoopWorker` workers (dense `rm_scores` from
    erm's reward manager)."""

    def __init__(self, *args, **kwargs):
        self.agent_loop_workers_class = ray.remote(DenseAgentLoopWorker)
        super().__init__(*args, **kwargs)
