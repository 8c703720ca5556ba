"""erm inside verl, driven through verl's own classes (verl installed for real, CPU, tiny models).

verl and the few packages its reward loop, DataProto, agent loop and trainer helpers import live
in `.venv/peers/verl` (`bash dev/setup.sh` puts them there with `--no-deps`: verl pins an older
transformers than erm's); the folder is appended to sys.path, so nothing in it shadows the main
environment. Ray actors, vLLM servers and the trainers' fit loops are not started: the tests call
the classes those run (`RewardLoopWorker`, `AgentLoopWorker`'s post-processing, the reward-manager
loader, `compute_advantage`, the HF forwards' fused path) in this process.
"""
import asyncio
import importlib.metadata
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import erm
from erm import lm
from tests.clitest import tiny_model_dir
from tests.tiny import tiny_model_and_tokenizer, tiny_tokenizer

VERL = "0.9.1"
PEER = Path(__file__).resolve().parents[1] / ".venv" / "peers" / "verl"
P_WIDTH, R_WIDTH = 48, 40
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MATH = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"}]
CASES = [  # (prompt, response, finished: True / cut at the length limit: False)
    (FRANCE, "The capital of France is Paris.", True),
    (FRANCE, "Berlin is the capital of Germany. Madrid is the capital of Spain.", False),
    (MATH, "I think the answer is 4.", True),
    (MATH, "Two plus two equals four.", True),
]


@pytest.fixture(scope="module")
def verl():
    if not (PEER / "verl").is_dir():
        pytest.fail(f"verl is not installed in {PEER}: run `bash dev/setup.sh`")
    if str(PEER) not in sys.path:
        sys.path.append(str(PEER))
    import verl as v

    assert v.__version__ == VERL, (f"{PEER} holds verl {v.__version__}, these tests expect "
                                   f"{VERL}: run `bash dev/setup.sh`")
    return v


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return Path(tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=3))


@pytest.fixture(scope="module")
def rm(model_dir):
    return erm.EndoRM.from_pretrained(str(model_dir), device="cpu", dtype="float32")


def _config(model_dir, *, tokenizer_dir=None, **reward_kwargs):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": str(model_dir),
                                        "tokenizer_path": str(tokenizer_dir or model_dir)}},
        "reward": {"num_workers": 1,
                   "reward_manager": {"source": "register", "name": "erm",
                                      "module": {"path": None, "name": "custom_reward_manager"}},
                   "custom_reward_function": {"path": None, "name": "compute_score"},
                   "reward_model": {"enable": False}, "sandbox_fusion": {"url": None},
                   "reward_kwargs": {"model": str(model_dir), "dtype": "float32",
                                     "device": "cpu", **reward_kwargs}}})


def _rollouts(rm, model=None):
    """(prompt ids, response ids, finished) per case as a policy sharing the reward model's
    tokenizer writes them: the chat template's generation prompt, then the response tokens (the
    end-of-turn token last when the turn finished); plus one response sampled from `model`."""
    tok = rm.tokenizer
    out = []
    for msgs, text, done in CASES:
        ctx = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        enc = rm.encode(msgs, text, terminated=done)
        assert enc.ids[:-enc.n_resp] == ctx
        out.append((msgs, ctx, enc.ids[-enc.n_resp:], done))
    if model is not None:
        msgs = [{"role": "user", "content": "Name a capital."}]
        ctx = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        torch.manual_seed(0)
        gen = model.generate(torch.tensor([ctx]), max_new_tokens=12, do_sample=True,
                             suppress_tokens=list(rm.end_ids), pad_token_id=tok.pad_token_id)
        out.append((msgs, ctx, gen[0, len(ctx):].tolist(), False))
    return out


def _data_proto(rollouts, pad_id: int, uids=None):
    """verl's rollout batch: left-padded prompts, right-padded responses, masks, raw chats."""
    from tensordict import TensorDict
    from verl import DataProto

    b = len(rollouts)
    prompts = torch.full((b, P_WIDTH), pad_id)
    responses = torch.full((b, R_WIDTH), pad_id)
    mask = torch.zeros((b, P_WIDTH + R_WIDTH), dtype=torch.long)
    raw = np.empty(b, dtype=object)
    for i, (msgs, ctx, resp, _) in enumerate(rollouts):
        prompts[i, P_WIDTH - len(ctx):] = torch.tensor(ctx)
        responses[i, :len(resp)] = torch.tensor(resp)
        mask[i, P_WIDTH - len(ctx):P_WIDTH + len(resp)] = 1
        raw[i] = np.array(msgs, dtype=object)
    batch = TensorDict({"prompts": prompts, "responses": responses,
                        "input_ids": torch.cat([prompts, responses], 1), "attention_mask": mask,
                        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                        "response_mask": mask[:, P_WIDTH:]}, batch_size=b)
    uid = np.array(uids if uids is not None else [str(i) for i in range(b)], dtype=object)
    return DataProto(batch=batch, non_tensor_batch={
        "raw_prompt": raw, "uid": uid, "data_source": np.array(["erm"] * b, dtype=object),
        "reward_model": np.array([{"ground_truth": ""}] * b, dtype=object)})


def _expected(rm, rollouts):
    """erm's per-token rewards of each rollout (EndoRM.token_rewards for finished text cases,
    EndoRM.encoded_stats of the ids otherwise) and EndoRM.score of each text case."""
    per_token, sums = [], []
    for k, (msgs, ctx, resp, done) in enumerate(rollouts):
        if k < len(CASES) and done:
            per_token.append(rm.token_rewards(msgs, CASES[k][1]).rewards)
        else:
            enc = lm.Encoded(ids=ctx + resp, n_resp=len(resp), terminated=done)
            per_token.append(rm.encoded_stats([enc])[0][0])
        if k < len(CASES):
            sums.append(float(rm.score(msgs, CASES[k][1], terminated=done)[0]))
    return per_token, sums


def _rm_scores(worker, data):
    """What verl's RewardLoopManager.compute_rm_score does on one reward worker: every sample
    scored concurrently, then the manager class assembles rm_scores."""
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))
    scores = [o["reward_score"] for o in outputs]
    return worker.reward_manager.assemble_rm_scores(data, scores), outputs


def _worker(verl, config):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    return RewardLoopWorker(config, reward_router_address=None)


# ------------------------------------------------------------------------------ registration
def test_the_entry_point_registers_the_manager_with_verl(verl, model_dir):
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    from erm.integrations.verl_manager import EndogenousRewardManager

    eps = {e.name: e.value for e in importlib.metadata.entry_points(group="verl.plugins")}
    assert eps.get("erm") == "erm.integrations.verl_manager", (
        f"erm's verl.plugins entry point is not installed ({eps}): run `bash dev/setup.sh`")
    assert get_reward_manager_cls("erm") is EndogenousRewardManager
    cfg = _config(model_dir)
    cfg.reward.reward_manager.source = "importlib"
    cfg.reward.reward_manager.name = "EndogenousRewardManager"
    cfg.reward.reward_manager.module.path = "pkg://erm.integrations.verl"
    assert resolve_reward_manager_cls(cfg) is EndogenousRewardManager


# ------------------------------------------------------------------------------ the reward manager
def test_reward_worker_gives_endorm_token_rewards(verl, model_dir, rm):
    from erm.integrations.verl_manager import EndogenousRewardManager

    rollouts = _rollouts(rm, rm.model)
    data = _data_proto(rollouts, rm.tokenizer.pad_token_id)
    worker = _worker(verl, _config(model_dir, batch_size=8, max_wait_ms=200))
    assert isinstance(worker.reward_manager, EndogenousRewardManager)
    assert worker.reward_manager.same_tokenizer
    batches = worker.reward_manager.scorer._tokens.batches
    rm_scores, outputs = _rm_scores(worker, data)
    assert worker.reward_manager.scorer._tokens.batches - batches == 1   # one batched forward
    assert rm_scores.shape == (len(rollouts), R_WIDTH) and rm_scores.dtype == torch.float32
    per_token, sums = _expected(rm, rollouts)
    for i, ((_, _, resp, done), want) in enumerate(zip(rollouts, per_token)):
        n = len(resp)
        assert len(want) == n
        torch.testing.assert_close(rm_scores[i, :n], want, rtol=1e-5, atol=1e-5)
        assert not rm_scores[i, n:].any()
        info = outputs[i]["reward_extra_info"]
        assert info["erm_response_tokens"] == n and info["erm_truncated"] == int(not done)
    got_sums = rm_scores.sum(-1)[:len(CASES)].tolist()
    assert got_sums == pytest.approx(sums, rel=1e-5, abs=1e-5)
    assert sums[1] != pytest.approx(float(rm.score(FRANCE, CASES[1][1])[0]))  # cut ≠ finished


def test_mean_reduction_and_last_token_mode(verl, model_dir, rm):
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

    rollouts = _rollouts(rm)
    data = _data_proto(rollouts, rm.tokenizer.pad_token_id)
    dense, _ = _rm_scores(_worker(verl, _config(model_dir)), data)
    mean, _ = _rm_scores(_worker(verl, _config(model_dir, reduction="mean")), data)
    last, outs = _rm_scores(_worker(verl, _config(model_dir, dense=False)), data)
    n = torch.tensor([len(r) for _, _, r, _ in rollouts])
    torch.testing.assert_close(mean, dense / n[:, None], rtol=1e-5, atol=1e-6)
    scores = [o["reward_score"] for o in outs]
    assert all(isinstance(s, float) for s in scores)
    torch.testing.assert_close(last, RewardManagerBase.assemble_rm_scores(data, scores))
    for i, k in enumerate(n.tolist()):
        assert last[i, k - 1] == pytest.approx(float(dense[i].sum()), rel=1e-5, abs=1e-5)
        assert not last[i, :k - 1].any()


def test_system_prompt_scores_the_raw_chat(verl, model_dir, rm):
    sp = "Answer briefly."
    rollouts = _rollouts(rm)
    data = _data_proto(rollouts, rm.tokenizer.pad_token_id)
    rm_scores, _ = _rm_scores(_worker(verl, _config(model_dir, system_prompt=sp)), data)
    for i, (msgs, text, done) in enumerate(CASES):
        want = float(rm.score(msgs, text, system_prompt=sp, terminated=done)[0])
        assert float(rm_scores[i].sum()) == pytest.approx(want, rel=1e-5, abs=1e-5)
        if done:
            torch.testing.assert_close(rm_scores[i, :len(rollouts[i][2])],
                                       rm.token_rewards(msgs, text, system_prompt=sp).rewards,
                                       rtol=1e-5, atol=1e-5)


def test_another_tokenizer_puts_the_reward_on_the_last_token(verl, model_dir, rm, tmp_path,
                                                             caplog):
    tok = tiny_tokenizer()
    tok.add_tokens(["<policy-only>"])                      # a vocabulary the reward model lacks
    tok.save_pretrained(tmp_path)
    rollouts = _rollouts(rm)
    data = _data_proto(rollouts, rm.tokenizer.pad_token_id)
    worker = _worker(verl, _config(model_dir, tokenizer_dir=tmp_path))
    assert not worker.reward_manager.same_tokenizer
    with caplog.at_level(logging.WARNING, logger="erm.integrations.verl"):
        rm_scores, _ = _rm_scores(worker, data)
    assert sum("last token" in r.getMessage() for r in caplog.records) <= 1
    for i, (msgs, text, done) in enumerate(CASES):
        n = len(rollouts[i][2])
        want = float(rm.score(msgs, text, terminated=done)[0])
        assert float(rm_scores[i, n - 1]) == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert not rm_scores[i, :n - 1].any()


def test_erm_serve_does_the_scoring(verl, model_dir, rm):
    from erm.serve import running

    rollouts = _rollouts(rm)
    data = _data_proto(rollouts, rm.tokenizer.pad_token_id)
    per_token, _ = _expected(rm, rollouts)
    with running(rm, api_key="s3cret") as url:
        cfg = _config(model_dir)
        cfg.reward.reward_kwargs = {"url": url, "api_key": "s3cret"}
        rm_scores, _ = _rm_scores(_worker(verl, cfg), data)
        cfg.reward.reward_kwargs = {"url": url, "api_key": "wrong"}
        with pytest.raises(RuntimeError, match="answered 401"):
            _worker(verl, cfg)
    for i, (_, _, resp, _) in enumerate(rollouts):
        torch.testing.assert_close(rm_scores[i, :len(resp)], per_token[i], rtol=1e-5,
                                   atol=1e-5)


# ------------------------------------------------------------------------------ agent loop
def _agent_worker(cls, reward_worker, tok):
    """verl's agent-loop worker as its trajectories' post-processing sees it (no LLM server: the
    responses are given) with one reward worker behind a stand-in for its Ray actor handle."""
    w = object.__new__(cls)
    w.tokenizer, w.processor, w.mm_processor_kwargs = tok, None, {}
    w.rollout_config = SimpleNamespace(prompt_length=P_WIDTH, response_length=R_WIDTH)
    w.distillation_enabled = False
    w.reward_loop_worker_handles = [SimpleNamespace(
        compute_score=SimpleNamespace(remote=reward_worker.compute_score))]
    return w


def _agent_batch(worker, rollouts):
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    async def run():
        outs = []
        for k, (msgs, ctx, resp, _) in enumerate(rollouts):
            out = AgentLoopOutput(prompt_ids=ctx, response_ids=resp, response_mask=[1] * len(resp),
                                  num_turns=2, metrics=AgentLoopMetrics())
            outs.append(worker._agent_loop_postprocess(
                out, False, raw_prompt=msgs, uid=str(k), data_source="erm",
                reward_model={"ground_truth": ""}))
        return await asyncio.gather(*outs)

    return worker._postprocess(asyncio.run(run()))


def test_dense_agent_loop_writes_per_token_rm_scores(verl, model_dir, rm):
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    from erm.integrations.verl import DenseAgentLoopManager, DenseAgentLoopWorker

    cfg = _config(model_dir)
    cfg.actor_rollout_ref.rollout = {"agent": {
        "agent_loop_manager_class": "erm.integrations.verl.DenseAgentLoopManager"}}
    cfg.trainer = {"use_v1": False}
    rollouts = _rollouts(rm, rm.model)
    per_token, _ = _expected(rm, rollouts)
    reward = _worker(verl, cfg)
    out = _agent_batch(_agent_worker(DenseAgentLoopWorker, reward, rm.tokenizer), rollouts)
    assert issubclass(DenseAgentLoopManager, verl.experimental.agent_loop.AgentLoopManager)
    assert "erm_token_rewards" not in out.non_tensor_batch
    for i, (_, _, resp, _) in enumerate(rollouts):
        torch.testing.assert_close(out.batch["rm_scores"][i, :len(resp)], per_token[i],
                                   rtol=1e-5, atol=1e-5)
        assert not out.batch["rm_scores"][i, len(resp):].any()
    # verl's own worker with dense=False: the response reward on the last token
    last = _worker(verl, _config(model_dir, dense=False))
    out = _agent_batch(_agent_worker(AgentLoopWorker, last, rm.tokenizer), rollouts)
    for i, (_, _, resp, _) in enumerate(rollouts):
        assert out.batch["rm_scores"][i, len(resp) - 1] == pytest.approx(
            float(per_token[i].sum()), rel=1e-5, abs=1e-5)


def test_advantage_estimators_use_dense_rewards(verl, model_dir, rm):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rollouts = _rollouts(rm)
    data = _data_proto(rollouts, rm.tokenizer.pad_token_id, uids=["a", "a", "b", "b"])
    rm_scores, _ = _rm_scores(_worker(verl, _config(model_dir)), data)
    mask = data.batch["response_mask"].float()
    dense = rm_scores * mask
    to_go = dense.flip(-1).cumsum(-1).flip(-1) * mask       # Σ_{s ≥ t} r_s: per-token returns
    algo = AlgoConfig(gamma=1.0, lam=1.0)
    for est in ("reinforce_plus_plus", "gae"):
        d = data.select(deepcopy=True)
        d.batch["token_level_rewards"] = rm_scores.clone()
        d.batch["values"] = torch.zeros_like(rm_scores)
        d = compute_advantage(d, est, gamma=1.0, lam=1.0, config=algo)
        torch.testing.assert_close(d.batch["returns"] * mask, to_go, rtol=1e-5, atol=1e-5)
        assert d.batch["returns"][0, 0] != pytest.approx(d.batch["returns"][0, 1].item())
    d = data.select(deepcopy=True)
    d.batch["token_level_rewards"] = rm_scores.clone()
    d = compute_advantage(d, "grpo", config=algo)
    sums = rm_scores.sum(-1)
    for g in ((0, 1), (2, 3)):
        s = sums[list(g)]
        want = (s - s.mean()) / (s.std() + 1e-6)
        for j, i in enumerate(g):
            adv = d.batch["advantages"][i][mask[i].bool()]
            torch.testing.assert_close(adv, torch.full_like(adv, float(want[j])), rtol=1e-5,
                                       atol=1e-5)


# ------------------------------------------------------------------------------ start-up errors
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_configuration_fails_at_start_up(verl, model_dir, tmp_path):
    from verl.trainer.ppo.reward import load_reward_manager

    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['modle'\]"):
        load_reward_manager(_config(model_dir, modle="x"), tok)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        load_reward_manager(_config(model_dir, reduction="max"), tok)
    with pytest.raises(ValueError, match="alpha must be a positive number, got 0"):
        load_reward_manager(_config(model_dir, alpha=0), tok)
    with pytest.raises(TypeError, match="dense must be true or false"):
        load_reward_manager(_config(model_dir, dense="yes"), tok)
    with pytest.raises(ValueError, match=r"reward_kwargs.model=.*cannot be loaded"):
        load_reward_manager(_config(tmp_path / "no-such-model"), tok)
    cfg = _config(model_dir)
    cfg.reward.reward_kwargs = {"url": f"http://127.0.0.1:{_free_port()}", "timeout": 5}
    with pytest.raises(ConnectionError, match="cannot reach erm serve at http://127.0.0.1"):
        load_reward_manager(cfg, tok)
    cfg = _config(model_dir)
    cfg.actor_rollout_ref.rollout = {"agent": {"agent_loop_manager_class": None}}
    cfg.trainer = {"use_v1": True}
    with pytest.raises(ValueError, match="dense=True .* needs trainer.use_v1=False .*"
                                         "agent_loop_manager_class"):
        load_reward_manager(cfg, tok)
    cfg.reward.reward_kwargs.dense = False          # one number per response: any agent loop
    load_reward_manager(cfg, tok)


# ------------------------------------------------------------------------------ compute_score
def test_compute_score_through_verls_naive_manager(verl, model_dir, rm):
    from verl.trainer.ppo.reward import load_reward_manager

    from erm.integrations.verl import scorer_for, reward_options

    cfg = _config(model_dir)
    cfg.reward.reward_manager.name = "naive"
    cfg.reward.custom_reward_function = {
        "path": "pkg://erm.integrations.verl", "name": "compute_score",
        "reward_kwargs": {"model": str(model_dir), "dtype": "float32", "device": "cpu",
                          "max_wait_ms": 1000.0}}
    manager = load_reward_manager(cfg, rm.tokenizer)
    texts = [c for c in CASES if c[2]]
    data = _data_proto([(m, [1], rm.tokenizer(t, add_special_tokens=False)["input_ids"], True)
                        for m, t, _ in texts], rm.tokenizer.pad_token_id)
    data.non_tensor_batch["extra_info"] = np.array([{"prompt": m} for m, _, _ in texts])
    scorer = scorer_for(reward_options(cfg.reward.custom_reward_function.reward_kwargs,
                                       dense=False))
    before = scorer._texts.batches

    async def run():
        return await asyncio.gather(*[manager.run_single(data[i:i + 1])
                                      for i in range(len(texts))])

    got = [o["reward_score"] for o in manager.loop.run_until_complete(run())]
    assert scorer._texts.batches - before == 1
    want = rm.score([m for m, _, _ in texts], [t for _, t, _ in texts]).tolist()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_compute_score_errors(verl):
    from erm.integrations.verl import compute_score

    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dense'\]"):
        asyncio.run(compute_score("erm", "4.", "", {"prompt": "2+2?"}, dense=True))
    with pytest.raises(ValueError, match="compute_score needs the prompt"):
        asyncio.run(compute_score("erm", "4.", "", {"answer": "4"}))


# ------------------------------------------------------------------------------ fused kernels
def _tiny_hidden():
    model, tok = tiny_model_and_tokenizer("qwen2", seed=5)
    ids = tok(["The capital of France is Paris.", "Two plus two equals four."],
              return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
    return model, ids, hidden


def test_patched_fused_path_equals_verls_torch_backend(verl):
    import verl.utils.experimental.torch_functional as tf
    import verl.utils.kernel.linear_cross_entropy as lce

    from erm.integrations.verl import use_erm_kernels

    model, ids, hidden = _tiny_hidden()
    labels = torch.roll(ids, -1, -1)
    w0 = model.lm_head.weight.detach()
    theirs_cls = tf.FusedLinearForPPO
    assert hidden.shape[-1] % 128 != 0                  # a size verl's Triton kernel refuses

    def run(fused, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fused(h, w, labels, 0.7)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward(retain_graph=True)
        gh, gw = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        ent.sum().backward()
        return lp, ent, gh, gw, h.grad, w.grad

    want = run(theirs_cls(chunk_size=4).forward, hidden, w0)
    patched = use_erm_kernels()
    try:
        assert "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy" in patched
        got = run(tf.FusedLinearForPPO().forward, hidden, w0)
        flat = run(lambda h, w, t, temp: tuple(
            x.view(t.shape) for x in lce.linear_cross_entropy(h, w, t, temp, "none")), hidden, w0)
        lp_sum, _ = lce.linear_cross_entropy(hidden, w0, labels, 0.7, "sum")
    finally:
        assert use_erm_kernels(False)
    assert tf.FusedLinearForPPO is theirs_cls
    for g, f, w in zip(got, flat, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f.to(w.dtype), w, rtol=1e-5, atol=1e-5)
    assert got[0].dtype == torch.float32 and (got[0] <= 0).all()
    torch.testing.assert_close(lp_sum, want[0].sum(), rtol=1e-5, atol=1e-4)


def _tp_worker(rank, world, port):
    """One tensor-parallel rank: erm's linear_cross_entropy on this rank's rows of the LM head
    (Megatron's even split) equals the whole-vocabulary result, gradients included."""
    import os as _os
    from datetime import timedelta

    import torch.distributed as dist

    from erm.integrations.verl_kernels import erm_linear_cross_entropy

    _os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(0)
        h0, w0 = torch.randn(2, 7, 24, generator=g), torch.randn(64, 24, generator=g) * 0.5
        t = torch.randint(0, 64, (2, 7), generator=g)
        rows = slice(rank * 32, rank * 32 + 32)

        def run(w, group):
            h, w = h0.clone().requires_grad_(), w.clone().requires_grad_()
            lp, ent = erm_linear_cross_entropy(h, w, t, 0.8, "none", group)
            (lp.sum() + 0.3 * ent.sum()).backward()
            return lp, ent, h.grad, w.grad

        full = run(w0, None)
        part = run(w0[rows], dist.group.WORLD)
        for a, b in zip(part, (*full[:3], full[3][rows])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    _os._exit(0)


def test_vocab_parallel_linear_cross_entropy_equals_one_process():
    import torch.multiprocessing as mp

    mp.spawn(_tp_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_the_plugin_patches_verls_workers_when_asked(verl):
    code = ("import sys; sys.path.append(sys.argv[1]); import verl; "
            "import verl.utils.experimental.torch_functional as tf, "
            "verl.utils.kernel.linear_cross_entropy as lce; "
            "print(tf.FusedLinearForPPO.__module__, "
            "getattr(lce.linear_cross_entropy, '__module__', None) or 'verl.utils.kernel')")
    for flag in ("1", ""):
        env = {**os.environ, "ERM_VERL_KERNELS": flag, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", code, str(PEER)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        mods = out.stdout.split()
        # patched: both are erm's; not asked: verl's own (an autograd Function's `apply` names
        # torch.autograd.function as its module on some torch versions)
        ours = [m.startswith("erm.integrations.verl_kernels") for m in mods]
        assert len(mods) == 2 and (all(ours) if flag else not any(ours)), out.stdout


def test_hf_forward_with_the_fused_path_uses_erm(verl):
    from verl.models.transformers.dense_common import forward_with_torch_backend

    from erm.integrations.verl import use_erm_kernels

    model, ids, _ = _tiny_hidden()
    want = forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=1.0)
    use_erm_kernels()
    try:
        got = forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=1.0)
    finally:
        use_erm_kernels(False)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
