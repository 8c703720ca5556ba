"""erm.rl: the slim RL loop on endogenous rewards, on tiny random models (CPU, a few seconds)."""
import json
import math

import pytest
import torch

import erm
from erm import cli, dp, lm, rl, tasks
from tests.reference import token_stats_ref
from tests.tiny import tiny_model_and_tokenizer

PROMPTS = [{"prompt": f"What is {i} plus {i + 1}? Answer with a number.", "answer": str(2 * i + 1)}
           for i in range(8)]
TIMING = {"tokens_per_s", "step_time_s", "gen_time_s", "peak_mem_mb"}


def make_trainer(tmp_path, arch="llama", **kw):
    model, tok = tiny_model_and_tokenizer(arch, seed=0)
    base = dict(steps=2, prompts_per_step=2, k=3, max_new_tokens=6, lr=1e-3, out=str(tmp_path),
                progress=False, eval_prompts=0, save_every=-1)
    base.update(kw)
    return rl.Trainer(rl.RLConfig(**base), model, tok, train_prompts=PROMPTS, eval_prompts=[])


def manual_batch(tok, terminated=(True, False, True)):
    """A hand-made rollout: 3 prompts of different lengths, responses of lengths 3, 5 (full), 1."""
    ids, attn = rl.encode_prompts(tok, ["hi", "What is the capital of France?", "Hello world"])
    g = torch.Generator().manual_seed(0)
    resp = torch.randint(10, len(tok) - 10, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    resp = torch.where(mask, resp, torch.full_like(resp, tok.pad_token_id))
    return rl.Rollout(torch.cat([ids, resp], 1), torch.cat([attn, mask.long()], 1), ids.shape[1],
                      mask, torch.tensor(terminated), [None] * 3, [""] * 3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_rewards_match_endogenous_rewards_and_telescope(arch):
    model, tok = tiny_model_and_tokenizer(arch, seed=1)
    b, alpha = manual_batch(tok), 0.7
    ref_lp, r = rl.score(model, b, alpha=alpha)
    p = b.prompt_len
    full_mask = torch.zeros_like(b.input_ids, dtype=torch.bool)
    full_mask[:, p:] = b.response_mask
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                       position_ids=lm.position_ids(b.attention_mask)).logits
        expect = erm.endogenous_rewards(logits, b.input_ids, response_mask=full_mask, alpha=alpha,
                                        terminated=b.terminated)[:, p:]
        lp, lse, _, _ = token_stats_ref(logits[:, p - 1:-1], b.input_ids[:, p:], alpha)
        v1 = alpha * lse[:, 0]
    torch.testing.assert_close(r, expect, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ref_lp.double(), lp * b.response_mask, atol=1e-5, rtol=1e-5)
    # Σ r_t = α·log π(y|x) + V(s_1) (terminated), − V(s_{L+1}) more when truncated
    total = r.sum(1)
    lengths = b.response_mask.sum(1)
    v_end = torch.stack([alpha * token_stats_ref(logits[i, p + n - 1], torch.tensor(0), alpha)[1]
                         for i, n in enumerate(lengths.tolist())])
    expect_total = alpha * ref_lp.sum(1) + v1 - torch.where(b.terminated, 0.0, v_end)
    torch.testing.assert_close(total.double(), expect_total, atol=1e-3, rtol=1e-5)
    # dense reward-to-go at the first token is the response reward
    g = rl.reward_to_go(r, b.response_mask)
    torch.testing.assert_close(g[:, 0], total, atol=1e-4, rtol=1e-5)


def test_grpo_rloo_advantages():
    torch.manual_seed(0)
    rew = torch.randn(12)
    a = rl.grpo_advantages(rew, 4)
    assert a.view(3, 4).sum(1).abs().max() < 1e-5
    torch.testing.assert_close(a.view(3, 4).std(1), torch.ones(3), atol=1e-4, rtol=0)
    a0 = rl.grpo_advantages(rew, 4, scale=False)
    torch.testing.assert_close(a0.view(3, 4).sum(1), torch.zeros(3), atol=1e-5, rtol=0)
    loo = rl.rloo_advantages(rew, 4)
    g = rew.view(3, 4)
    for i in range(3):
        for j in range(4):
            others = torch.cat([g[i, :j], g[i, j + 1:]])
            assert abs(float(loo[i * 4 + j]) - float(g[i, j] - others.mean())) < 1e-5


def test_advantages_objectives_and_verifiable_bonus():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    r = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 0.5], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ver = torch.tensor([1.0, 0.0, 0.0, 1.0])
    cfg = rl.RLConfig(k=2, objective="reinforce", normalize=False, verifiable_weight=2.0)
    adv, resp = rl.advantages(cfg, r, mask, ver)
    torch.testing.assert_close(resp, torch.tensor([5.0, 1.5, 3.0, 3.0]))
    torch.testing.assert_close(adv[:, 0], resp)          # reward-to-go + bonus on the last token
    assert adv[0, 2] == 0 and adv[2, 1] == 0
    cfg = rl.RLConfig(k=2, objective="grpo", verifiable_weight=2.0)
    adv, _ = rl.advantages(cfg, r, mask, ver)
    assert (adv[~mask] == 0).all() and adv[0, 0] > 0 > adv[1, 0]


def test_first_step_kl_zero_ratio_one(tmp_path):
    t = make_trainer(tmp_path, ppo_epochs=2)
    b = rl.rollout(t.policy, t.tokenizer, PROMPTS[:2], 3, max_new_tokens=6, temperature=1.0)
    ref_lp, r = rl.score(t.frozen, b, alpha=1.0)
    with torch.no_grad():
        lp, _ = rl.policy_logprobs(t.policy, b, alpha=1.0)
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)
    rec = t.step()
    assert abs(rec["kl"]) < 1e-7 and abs(rec["ratio"] - 1.0) < 1e-7
    rec2 = t.step()
    assert rec2["kl"] > 0                                        # the policy has moved


def test_frozen_copy_gets_no_gradient_and_does_not_change(tmp_path):
    t = make_trainer(tmp_path, lr=1e-2)
    before = {k: v.clone() for k, v in t.frozen.state_dict().items()}
    pol_before = {k: v.clone() for k, v in t.policy.state_dict().items()}
    t.step()
    assert all(not p.requires_grad and p.grad is None for p in t.frozen.parameters())
    for k, v in t.frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, pol_before[k]) for k, v in t.policy.state_dict().items())
    assert all(p.data_ptr() != q.data_ptr()
               for p, q in zip(t.policy.parameters(), t.frozen.parameters()))


def test_surrogate_loss_decreases_on_a_fixed_batch(tmp_path):
    t = make_trainer(tmp_path, kl_coef=0.0, lr=3e-3, clip_eps=10.0)
    torch.manual_seed(0)
    b = rl.rollout(t.policy, t.tokenizer, PROMPTS[:2], 3, max_new_tokens=6, temperature=1.0)
    ref_lp, r = rl.score(t.frozen, b, alpha=1.0)
    adv, _ = rl.advantages(t.cfg, r, b.response_mask, torch.zeros(6))
    with torch.no_grad():
        old, _ = rl.policy_logprobs(t.policy, b, alpha=1.0)
    m = rl.update(t.policy, t.optimizer, b, adv, ref_lp, t.cfg)
    losses = [m["loss"]]
    for _ in range(3):
        m = rl.update(t.policy, t.optimizer, b, adv, ref_lp, t.cfg, old_logprobs=old)
        losses.append(m["loss"])
    assert all(b2 < a2 for a2, b2 in zip(losses, losses[1:])), losses


def test_resume_reaches_the_same_state(tmp_path):
    a = make_trainer(tmp_path / "a", steps=2)
    ra = [a.step() for _ in range(2)]
    b = make_trainer(tmp_path / "b", steps=1)
    b.step()
    b.save()
    c = make_trainer(tmp_path / "b", steps=2, resume=True)
    assert c.step_idx == 1 and len(c.records) == 1
    rc = c.step()
    for k, v in ra[1].items():
        if k not in TIMING:
            assert rc[k] == v, (k, rc[k], v)
    for (k, v), w in zip(a.policy.state_dict().items(), c.policy.state_dict().values()):
        assert torch.equal(v, w), k
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_end_to_end_cli_writes_log_png_and_checkpoint(tmp_path, capsys):
    model, tok = tiny_model_and_tokenizer("qwen2", seed=0)
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(dict(d, split="eval" if i < 2 else "train")) + "\n"
                            for i, d in enumerate(PROMPTS)))
    out = tmp_path / "run"
    rc = cli.main(["rl", "--model", str(mdir), "--prompts", str(data), "--steps", "2", "--k", "2",
                   "--prompts-per-step", "2", "--max-new-tokens", "4", "--eval-max-new-tokens",
                   "4", "--objective", "rloo", "--verifiable-weight", "1", "--out", str(out),
                   "--plot", "--no-progress", "--ppo-epochs", "2", "--micro-batch", "2"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for key in ("reward", "accuracy", "kl", "entropy", "response_len", "clip_frac",
                "tokens_per_s", "peak_mem_mb"):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert (out / "curves.png").stat().st_size > 1000
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["step"] == 2 and meta["tensors"] == "checkpoint-2.pt"
    assert (out / "checkpoint-2.pt").exists() and not (out / "checkpoint.pt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert '"accuracy_after"' in capsys.readouterr().out


def test_builtin_arithmetic_prompts():
    rows = [json.loads(x) for x in tasks.ARITHMETIC.read_text().splitlines()]
    assert rows == tasks.make_arithmetic()          # the committed file is the generator's output
    train, held = tasks.load_prompts()
    assert len(train) + len(held) >= 100 and len(held) >= 20
    assert all(tasks.is_correct(f"so {r['answer']}.", r["answer"]) for r in held)
    assert tasks.final_number("It is 1,200 or -3.5 apples") == "-3.5"
    assert not tasks.is_correct("no number", "3") and tasks.is_correct("3.0", "3")


def test_erm_cli_registers_rl_and_flags_follow_the_config():
    from erm.cli import build_parser
    from erm.cli.rl import config_from_args

    args = build_parser().parse_args(["rl", "--steps", "3", "--objective", "reinforce",
                                      "--no-normalize", "--alpha", "0.5"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.objective, cfg.normalize, cfg.alpha) == (3, "reinforce",
                                                                              False, 0.5)
    assert cfg.model is None and cfg.kl_coef == 0.01
    with pytest.raises(ValueError):
        rl.RLConfig(objective="ppo")
    assert config_from_args(build_parser().parse_args(["rl", "--fsdp"])).fsdp


def test_a_device_this_machine_lacks_is_a_clear_error():
    bad = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"device {bad}: "):
        rl.RLConfig(device=bad)
    with pytest.raises(ValueError, match="not a torch device"):
        rl.RLConfig(device="gpu0")


def test_fsdp_without_a_process_group_is_refused(tmp_path, monkeypatch):
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    with pytest.raises(ValueError, match="torchrun"):
        rl.Trainer(rl.RLConfig(fsdp=True, out=str(tmp_path), progress=False), model, tok,
                   train_prompts=PROMPTS, eval_prompts=[])
    monkeypatch.setattr(dp, "fsdp_on_cpu", lambda: False)   # torch 2.6's FSDP2
    with pytest.raises(RuntimeError, match="cannot run on the CPU"):
        dp.wrap_fsdp(model)


def test_bench_rl_step_smoke(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benches" / "bench_rl_step.py"
    spec = importlib.util.spec_from_file_location("bench_rl_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--device", "cpu", "--dtype", "float32", "--layers", "1", "--hidden", "32",
                     "--heads", "4", "--kv-heads", "2", "--intermediate", "64", "--vocab", "300",
                     "--batch", "2", "--seq", "16", "--reps", "1", "--warmup", "1"])
    assert [r["name"].split()[0] for r in rows] == ["fused", "plain"]
    out = capsys.readouterr().out
    assert "| path |" in out
    rel = float(out.split("rel. diff ")[1].split(")")[0])
    assert rel < 1e-4                                   # fused and plain give the same loss
