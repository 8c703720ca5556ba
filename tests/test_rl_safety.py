"""erm rl against hostile or broken inputs: checkpoints that carry code or are damaged, runs that
would resume another run's state, non-finite losses and gradients, options that make no sense
(tiny random models on the CPU, a few seconds each)."""
import json
import os

import pytest
import torch

from erm import checkpoint, cli, lm, rl
from tests.test_rl import PROMPTS, make_trainer
from tests.tiny import tiny_model_and_tokenizer


class Payload:
    """Unpickling this runs `touch MARKER` (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def model_dir(tmp_path):
    model, tok = tiny_model_and_tokenizer("qwen2", seed=0)
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(d) + "\n" for d in PROMPTS))
    return p


def _cli(capsys, *argv):
    """`erm rl ARGV` → (exit status, stderr)."""
    rc = cli.main(["rl", *map(str, argv)])
    return rc, capsys.readouterr().err


def _cli_args(model_dir, prompts_file, out, *more):
    return ["--model", model_dir, "--prompts", prompts_file, "--out", out, "--steps", 1,
            "--k", 2, "--prompts-per-step", 2, "--max-new-tokens", 3, "--eval-prompts", 0,
            "--no-progress", *more]


def _one_error_line(err: str, *fragments: str) -> None:
    lines = [x for x in err.splitlines() if x.startswith("erm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ------------------------------------------------------------------ no code from a checkpoint
def test_a_pickled_checkpoint_never_runs_its_code(tmp_path):
    """An old-style pickle `checkpoint.pt` and a tensor file whose pickle builds an object: both
    refused, the payload never runs."""
    marker = tmp_path / "ran"
    out = tmp_path / "legacy"
    out.mkdir()
    torch.save({"step": 1, "policy": Payload(marker), "optimizer": {}, "rng": {}},
               out / "checkpoint.pt")
    with pytest.raises(checkpoint.CheckpointError, match="older erm"):
        make_trainer(out, resume=True)
    assert not marker.exists()
    t = make_trainer(tmp_path / "run")
    t.step()
    t.save()
    torch.save({"step": 1, "policy": Payload(marker), "optimizer": {}},
               tmp_path / "run" / "checkpoint-1.pt")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint-1.pt: not a checkpoint"):
        make_trainer(tmp_path / "run", resume=True)
    assert not marker.exists()


def test_the_checkpoint_holds_tensors_and_json_only(tmp_path):
    t = make_trainer(tmp_path)
    t.step()
    t.save()
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["format"] == checkpoint.FORMAT and meta["step"] == 1
    assert meta["config"]["k"] == 3 and "sha256" in meta["model_weights"]
    assert set(meta["rng"]) == {"torch", "python", "cuda"}
    ck = torch.load(tmp_path / meta["tensors"], weights_only=True)
    assert set(ck) == {"step", "policy", "optimizer"}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "json", "format"])
def test_a_damaged_checkpoint_is_one_error_line(tmp_path, model_dir, prompts_file, capsys,
                                               damage):
    out = tmp_path / "run"
    assert _cli(capsys, *_cli_args(model_dir, prompts_file, out))[0] == 0
    pt, js = out / "checkpoint-1.pt", out / "checkpoint.json"
    if damage == "truncate":
        pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    elif damage == "garbage":
        pt.write_bytes(os.urandom(4096))
    elif damage == "json":
        js.write_text(js.read_text()[:100])
    else:
        js.write_text(json.dumps(dict(json.loads(js.read_text()), format=99)))
    rc, err = _cli(capsys, *_cli_args(model_dir, prompts_file, out, "--resume", "--steps", 2))
    assert rc == 2
    _one_error_line(err, str(js if damage in ("json", "format") else pt))


# ------------------------------------------------------------------ resume only the same run
def test_resume_refuses_another_config_naming_the_differences(tmp_path):
    t = make_trainer(tmp_path)
    t.step()
    t.save()
    with pytest.raises(checkpoint.CheckpointError) as info:
        make_trainer(tmp_path, resume=True, k=2, lr=3e-3, objective="rloo")
    msg = str(info.value)
    for part in ("k: 3 in the checkpoint, 2 now", "lr: 0.001 in the checkpoint, 0.003 now",
                 "objective: 'grpo' in the checkpoint, 'rloo' now", "--resume-force"):
        assert part in msg, (part, msg)
    with pytest.warns(UserWarning, match="k: 3 in the checkpoint, 2 now"):
        forced = make_trainer(tmp_path, resume=True, resume_force=True, k=2)
    assert forced.step_idx == 1
    assert make_trainer(tmp_path, resume=True, steps=5, save_every=2).step_idx == 1


def test_resume_refuses_another_model_of_the_same_shape(tmp_path):
    t = make_trainer(tmp_path)
    t.step()
    t.save()
    other, tok = tiny_model_and_tokenizer("llama", seed=1)   # same shape, other weights
    cfg = rl.RLConfig(**{**t.cfg.__dict__, "resume": True})
    with pytest.raises(checkpoint.CheckpointError, match="model_weights"):
        rl.Trainer(cfg, other, tok, train_prompts=PROMPTS, eval_prompts=[])


def test_resume_refuses_weights_replaced_at_the_same_path(tmp_path, model_dir, prompts_file,
                                                         capsys):
    out = tmp_path / "run"
    assert _cli(capsys, *_cli_args(model_dir, prompts_file, out))[0] == 0
    tiny_model_and_tokenizer("qwen2", seed=1)[0].save_pretrained(model_dir)
    rc, err = _cli(capsys, *_cli_args(model_dir, prompts_file, out, "--resume", "--steps", 2))
    assert rc == 2
    _one_error_line(err, "model_weights.files.model.safetensors.sha256", "--resume-force")
    rc, err = _cli(capsys, *_cli_args(model_dir, prompts_file, out, "--resume", "--steps", 2,
                                      "--resume-force"))
    assert rc == 0
    assert "erm: warning: --resume: " in err and "model_weights.files" in err, err


# ------------------------------------------------------------------ non-finite steps
def _nan_advantages(monkeypatch):
    real = rl.advantages

    def poisoned(*a, **kw):
        adv, resp = real(*a, **kw)
        return adv * float("nan"), resp
    monkeypatch.setattr(rl, "advantages", poisoned)


def test_a_nan_gradient_is_skipped_and_counted_then_aborts(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, max_bad_steps=2, steps=5)
    t.step()
    t.save()
    good = {k: v.clone() for k, v in t.policy.state_dict().items()}
    opt_state = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    _nan_advantages(monkeypatch)
    with pytest.warns(UserWarning, match="step 2: the loss or the gradient was not finite"):
        rec = t.step()
    assert rec["skipped"] and rec["loss"] is None
    for k, v in t.policy.state_dict().items():
        assert torch.equal(v, good[k]), k                     # no update was applied
    for k, v in t.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, opt_state[k]), k
    t.save()                                                  # finite: written
    with pytest.raises(rl.NonFiniteTraining, match="--max-bad-steps 2"):
        t.step()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    recs = [json.loads(x, parse_constant=pytest.fail) for x in lines]   # no NaN literal
    assert [r["skipped"] for r in recs] == [False, True, True]
    meta = checkpoint.read_meta(tmp_path)
    ck = torch.load(tmp_path / meta["tensors"], weights_only=True)
    assert meta["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["policy"].values())


def test_one_bad_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    real, calls = rl.advantages, []

    def second_is_nan(*a, **kw):
        calls.append(1)
        adv, resp = real(*a, **kw)
        return (adv * float("inf") if len(calls) == 2 else adv), resp
    monkeypatch.setattr(rl, "advantages", second_is_nan)
    t = make_trainer(tmp_path, steps=3, max_bad_steps=2)
    with pytest.warns(UserWarning, match="step 2"):
        summary = t.train()
    assert summary["skipped_steps"] == 1
    assert [r["skipped"] for r in summary["steps"]] == [False, True, False]
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)


def test_non_finite_aborts_from_the_cli_in_one_line(tmp_path, model_dir, prompts_file, capsys,
                                                    monkeypatch):
    _nan_advantages(monkeypatch)
    rc, err = _cli(capsys, *_cli_args(model_dir, prompts_file, tmp_path / "run",
                                      "--max-bad-steps", 1))
    assert rc == 2
    _one_error_line(err, "step 1", "not finite")


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    t = make_trainer(tmp_path)
    t.step()
    t.save()
    before = (tmp_path / "checkpoint.json").read_text()
    with torch.no_grad():
        next(t.policy.parameters()).view(-1)[0] = float("nan")
    t.step_idx += 1
    with pytest.raises(checkpoint.CheckpointError, match="non-finite values in model"):
        t.save()
    assert (tmp_path / "checkpoint.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.pt", "checkpoint.json",
                                                          "log.jsonl"]


def test_a_failed_write_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    t = make_trainer(tmp_path)
    t.step()
    t.save()
    t.step()

    def disk_full(obj, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        t.save()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.pt", "checkpoint.json",
                                                          "log.jsonl"]
    assert make_trainer(tmp_path, resume=True).step_idx == 1


# ------------------------------------------------------------------ options checked first
@pytest.mark.parametrize("bad, match", [
    (dict(objective="grpo", k=1), "grpo needs k >= 2"),
    (dict(objective="rloo", k=1), "rloo needs k >= 2"),
    (dict(clip_eps=-1.0), "clip_eps must be a finite number > 0"),
    (dict(kl_coef=-5.0), "kl_coef must be a finite number >= 0"),
    (dict(alpha=1e-6), "alpha"),
    (dict(temperature=1e-6), "alpha"),
    (dict(lr=float("nan")), "lr must be"),
    (dict(max_bad_steps=0), "max_bad_steps must be an int >= 1"),
    (dict(eval_max_new_tokens=0), "eval_max_new_tokens"),
])
def test_bad_options_are_refused_by_the_config(bad, match):
    with pytest.raises(ValueError, match=match):
        rl.RLConfig(**bad)


@pytest.mark.parametrize("argv, match", [
    (["--objective", "grpo", "--k", "1"], "grpo needs k >= 2"),
    (["--clip-eps", "-1"], "clip_eps"),
    (["--kl-coef", "-5"], "kl_coef"),
    (["--temperature", "1e-6"], "alpha"),
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_options_fail_before_any_model_loads(tmp_path, monkeypatch, capsys, argv, match):
    def no_load(*a, **kw):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(lm, "load", no_load)
    monkeypatch.chdir(tmp_path)
    rc, err = _cli(capsys, "--out", tmp_path / "run", "--no-progress", *argv)
    assert rc == 2
    _one_error_line(err, match)
