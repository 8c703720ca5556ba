"""erm.integrations.trl: the endogenous reward as a TRL reward function (tiny models, CPU)."""
import copy

import pytest
import torch

import erm
from erm.integrations.trl import EndogenousRewardFunc, endogenous_reward_func
from tests.tiny import tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def rm():
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    return erm.EndoRM(model, tok, alpha=0.8)


def test_standard_and_conversational_formats_match_endorm(rm):
    f = endogenous_reward_func(rm)
    assert isinstance(f, EndogenousRewardFunc) and f.__name__ == "endogenous_reward"
    prompts = ["What is 2+2?", "Name a capital."]
    comps = ["It is 4.", "Paris is the capital of France."]
    expect = rm.score(prompts, comps).tolist()
    end = tok_end = next(iter(rm.end_ids))
    got = f(prompts=prompts, completions=comps, completion_ids=[[7, end], [9, tok_end]],
            trainer_state=None)
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    assert got == pytest.approx(expect, rel=1e-6, abs=1e-5)
    # a completion cut at the length limit (no end id) is scored as truncated
    cut = f(prompts=prompts, completions=comps, completion_ids=[[7, end], [9, 10]])
    want = rm.score(prompts, comps, terminated=[True, False]).tolist()
    assert cut == pytest.approx(want, rel=1e-6, abs=1e-5) and cut[1] != pytest.approx(expect[1])
    keep_all = endogenous_reward_func(rm, detect_truncation=False)
    assert keep_all(prompts, comps, completion_ids=[[7, end], [9, 10]]) == pytest.approx(expect)
    chat_p = [[{"role": "user", "content": p}] for p in prompts]
    chat_c = [[{"role": "assistant", "content": c}] for c in comps]
    assert f(chat_p, chat_c) == pytest.approx(expect, rel=1e-6, abs=1e-5)
    # mean reduction, a system prompt, an empty completion
    g = endogenous_reward_func(rm, reduction="mean", system_prompt="Be brief.", empty_reward=-1.0)
    out = g(prompts + ["x"], comps + ["  "])
    assert out[-1] == -1.0
    assert out[:2] == pytest.approx(rm.score(prompts, comps, reduction="mean",
                                             system_prompt="Be brief.").tolist(), rel=1e-6,
                                    abs=1e-5)
    assert endogenous_reward_func(rm)(["x"], [""]) == [None]


def test_wraps_a_model_object():
    model, tok = tiny_model_and_tokenizer("qwen2", seed=1)
    f = endogenous_reward_func(model, tok, alpha=0.5, batch_size=2)
    assert f.rm.alpha == 0.5 and f.rm.batch_size == 2
    assert len(f(["a", "b", "c"], ["one", "two", "three"])) == 3
    with pytest.raises(ValueError):
        endogenous_reward_func(model)            # a model needs its tokenizer


def test_grpo_trainer_runs_with_the_endogenous_reward(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    policy, tok = tiny_model_and_tokenizer("llama", seed=0)
    reward = endogenous_reward_func(copy.deepcopy(policy), tok)       # frozen copy = the RM
    before = [p.detach().clone() for p in reward.rm.model.parameters()]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} plus 2?"}]
                                       for i in range(8)]})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, max_steps=2, learning_rate=1e-4, report_to="none",
                      use_cpu=True, logging_steps=1, save_strategy="no", bf16=False,
                      disable_tqdm=True)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=ds,
                          processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/endogenous_reward/mean" in h]
    assert len(logs) == 2
    assert all(torch.isfinite(torch.tensor(h["rewards/endogenous_reward/mean"])) for h in logs)
    assert all(torch.equal(a, b) for a, b in zip(before, reward.rm.model.parameters()))
