"""The verl reward manager `erm` (`EndogenousRewardManager`), on verl's reward-loop base class.

Imported by verl itself at start-up through erm's `verl.plugins` entry point (which registers the
name `erm`), or through `reward.reward_manager.source=importlib` with
`module.path=pkg://erm.integrations.verl`. See `erm.integrations.verl` for the configuration.
This module imports verl.
"""
import logging
import os
from typing import Any, List

import torch
from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from .. import lm
from .verl import chat_of, reward_options, scorer_for, token_positions, use_erm_kernels

__all__ = ["EndogenousRewardManager", "check_dense_config", "DENSE_MANAGER"]

log = logging.getLogger("erm.integrations.verl")

#: The agent-loop manager class (by its dotted name) that turns per-token rewards into dense
#: `rm_scores`.
DENSE_MANAGER = "erm.integrations.verl.DenseAgentLoopManager"


def _select(config, key: str):
    """config[key] for a dotted key of a DictConfig or dict; None where any part is missing."""
    node = config
    for part in key.split("."):
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        except Exception:  # a struct DictConfig without the key
            return None
        if node is None:
            return None
    return node


def check_dense_config(config) -> None:
    """Raise ValueError when `config` is a trainer configuration whose agent loop would put one
    number per response on the last token (what dense rewards need: verl's V0 trainer,
    `trainer.use_v1=False`, with erm's agent-loop manager); a configuration without those keys
    (the manager driven on its own) passes."""
    problems = []
    if _select(config, "trainer.use_v1") is True:
        problems.append("trainer.use_v1=False (verl's V1 trainer writes one reward per response)")
    rollout = _select(config, "actor_rollout_ref.rollout")
    if rollout is not None:
        cls = _select(rollout, "agent.agent_loop_manager_class")
        if cls is None or not _is_dense_manager(cls):
            problems.append(f"actor_rollout_ref.rollout.agent.agent_loop_manager_class="
                            f"{DENSE_MANAGER} (got {cls!r})")
    if problems:
        raise ValueError("reward.reward_kwargs.dense=True (the default) needs "
                         + " and ".join(problems)
                         + "; or set +reward.reward_kwargs.dense=False for one reward per "
                           "response on its last token")


def _is_dense_manager(fqn) -> bool:
    """Whether the dotted name `fqn` is erm's dense agent-loop manager or a subclass of it."""
    if fqn == DENSE_MANAGER:
        return True
    import importlib

    module, _, name = str(fqn).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        from .verl_agent_loop import DenseAgentLoopManager
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, DenseAgentLoopManager)


@register("erm")
class EndogenousRewardManager(RewardManagerBase):
    """verl reward manager: the endogenous reward of each response, per token (dense) or on its
    last token.

    Built by verl (`load_reward_manager`) with the trainer config; the options are
    `config.reward.reward_kwargs` (see `erm.integrations.verl.reward_options`). The model is
    loaded (or the `erm serve` URL checked) here, so a bad option fails at start-up.

    `run_single(data)` returns {"reward_score": the per-token rewards (a list of floats, one
    per valid response token) when dense, else one float, "reward_extra_info": {"erm_reward":
    the response reward, "erm_response_tokens": its token count, "erm_truncated": 1 when it
    did not end with an end token}}; `assemble_rm_scores` builds the (B, response_length)
    `rm_scores` from them.
    """

    _warned_text = False

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None, **kwargs):
        super().__init__(config, tokenizer, compute_score)
        self.options = reward_options(_select(config, "reward.reward_kwargs"))
        if self.options["dense"]:
            check_dense_config(config)
        self.scorer = scorer_for(self.options)
        rm_tok = self.scorer.tokenizer
        self.same_tokenizer = rm_tok is not None and _same_vocab(tokenizer, rm_tok)
        self.end_ids = set(self.scorer.rm.end_ids if self.same_tokenizer
                           else lm.end_token_ids(None, tokenizer))

    # ------------------------------------------------------------------ one response
    def _ids(self, item):
        """(valid prompt ids, valid response ids) of one DataProto item (verl's layout: left-padded
        prompts, right-padded responses, one attention mask over both)."""
        prompts, responses = item.batch["prompts"], item.batch["responses"]
        mask = item.batch["attention_mask"]
        p = prompts.shape[-1]
        prompt_ids = prompts[mask[:p].bool()].tolist()
        n = int(mask[p:p + responses.shape[-1]].sum())
        return prompt_ids, responses[:n].tolist()

    def _raw_prompt(self, item, required: bool):
        raw = item.non_tensor_batch.get("raw_prompt")
        if raw is None and required:
            raise ValueError("the erm reward manager needs the raw chat of each prompt here "
                             "(data.return_raw_chat=True)")
        return None if raw is None else chat_of(raw)

    async def run_single(self, data: DataProto) -> dict:
        """The reward of the last sample of `data` (verl's per-sample call)."""
        item = data[-1:][0]
        prompt_ids, resp = self._ids(item)
        if not resp:
            return self._result([], 0.0, 0, True)
        terminated = resp[-1] in self.end_ids
        if self.same_tokenizer:
            sp = self.options["system_prompt"]
            ctx = prompt_ids
            if sp:
                ctx = lm.context_ids(self.scorer.rm.tokenizer,
                                     lm.messages(self._raw_prompt(item, True), sp))
            rm = self.scorer.rm
            enc = lm.join_context(rm.tokenizer, ctx, resp, end_ids=rm.end_ids,
                                  max_length=rm.max_length, terminated=terminated)
            lm.check_cut([enc], True, rm.max_length)
            r = (await self.scorer.token_rewards(enc)).tolist()
            return self._result(r, float(sum(r)), len(r), terminated)
        return await self._run_text(item, resp, terminated)

    async def _run_text(self, item, resp: List[int], terminated: bool) -> dict:
        text = self.tokenizer.decode(resp, skip_special_tokens=True)
        if not text.strip():
            return self._result([0.0] * len(resp), 0.0, len(resp), terminated)
        prompt = self._raw_prompt(item, True)
        out = await self.scorer.response_reward(prompt, text, terminated)
        total, n = out[0], out[1]
        per_token = out[2] if len(out) > 2 else None
        if per_token is None or len(per_token) != len(resp):
            self._say_last_token_once()
            per_token = [0.0] * (len(resp) - 1) + [float(total)]
        return self._result(per_token, float(total), int(n), terminated)

    def _say_last_token_once(self) -> None:
        if not type(self)._warned_text:
            type(self)._warned_text = True
            log.warning("erm reward manager: the reward model does not share the policy's "
                        "tokenizer, so each response is re-tokenized and its reward can only "
                        "be placed on its last token")

    def _result(self, per_token: List[float], total: float, n: int, terminated: bool) -> dict:
        scale = 1.0 / max(n, 1) if self.options["reduction"] == "mean" else 1.0
        reward = total * scale
        info = {"erm_reward": float(reward), "erm_response_tokens": int(n),
                "erm_truncated": int(not terminated)}
        if self.options["dense"]:
            score: Any = [float(x) * scale for x in per_token] or [0.0]
        else:
            score = float(reward)
        return {"reward_score": score, "reward_extra_info": info}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: list) -> torch.Tensor:
        """(B, response_length) float32 `rm_scores`: each sample's per-token rewards on its valid
        response tokens (one number on its last one)."""
        p = data.batch["prompts"].size(1)
        lengths = data.batch["attention_mask"][:, p:].sum(dim=1).tolist()
        out = token_positions(scores, lengths, data.batch["responses"].size(1))
        return out.to(data.batch["responses"].device)


def _same_vocab(a, b) -> bool:
    """Whether two tokenizers map the same strings to the same ids (and agree on EOS)."""
    if a is b:
        return True
    try:
        return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
    except Exception:
        return False


if os.environ.get("ERM_VERL_KERNELS", "").strip() == "1":
    use_erm_kernels()
