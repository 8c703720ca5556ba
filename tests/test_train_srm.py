"""`erm.train_sentence_rm` in one process: checkpoints (safetensors + JSON only, resumed runs
ending where uninterrupted ones do, refusals naming what differs), non-finite steps skipped,
LoRA adapters (peft, skipped without it), the curves PNG and the CLI's new options."""
import argparse
import json

import pytest
import torch

from erm import SentenceRM, srm_checkpoint, srm_lora, train_sentence_rm
from erm import srm_loop
from tests.tiny import SRM_PAIRS, tiny_model_and_tokenizer

PAIRS = SRM_PAIRS


def _train(out=None, frozen=False, **kw):
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    args = dict(model=model, tokenizer=tok, freeze_backbone=frozen, epochs=2, batch_size=2,
                lr=1e-3, head_lr=1e-2, attn_dim=16, progress=False, out=out, seed=1)
    args.update(kw)
    return train_sentence_rm(PAIRS, **args)


def _stop(summary):
    raise KeyboardInterrupt


def _same_weights(a, b, tol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("frozen", [False, True])
def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, frozen):
    full, hist = _train(tmp_path / "a", frozen)
    with pytest.raises(KeyboardInterrupt):  # stopped after the step-1 checkpoint
        _train(tmp_path / "c", frozen, save_every=1, on_epoch=_stop)
    index = json.loads((tmp_path / "c" / "checkpoint" / "checkpoint.json").read_text())
    assert index["step"] == 1 and [h["step"] for h in index["history"]] == [1]
    resumed, rhist = _train(tmp_path / "c", frozen, save_every=1, resume=True)
    assert [h["step"] for h in rhist] == [1, 2, 3, 4]
    assert [h["loss"] for h in rhist] == pytest.approx([h["loss"] for h in hist], rel=1e-6)
    _same_weights(resumed, full, 1e-6)
    files = sorted(p.name for p in (tmp_path / "c" / "checkpoint").iterdir())
    assert files == ["checkpoint.json", "state-00000004.safetensors"]  # nothing pickled


def test_resume_refuses_another_run_naming_what_differs(tmp_path):
    _train(tmp_path / "r", True, epochs=1)
    with pytest.raises(srm_checkpoint.CheckpointMismatch, match=r"config\.head_lr: 0\.01 there"):
        _train(tmp_path / "r", True, epochs=1, head_lr=0.02, resume=True)
    with pytest.raises(srm_checkpoint.CheckpointMismatch, match=r"data: '[0-9a-f]+' there"):
        model, tok = tiny_model_and_tokenizer("llama", seed=0)
        train_sentence_rm(PAIRS[:3], model=model, tokenizer=tok, freeze_backbone=True,
                          epochs=1, batch_size=2, lr=1e-3, head_lr=1e-2, attn_dim=16,
                          progress=False, out=tmp_path / "r", seed=1, resume=True)
    with pytest.raises(srm_checkpoint.CheckpointMismatch, match=r"model\.weights"):
        model, tok = tiny_model_and_tokenizer("llama", seed=5)
        train_sentence_rm(PAIRS, model=model, tokenizer=tok, freeze_backbone=True,
                          epochs=1, batch_size=2, lr=1e-3, head_lr=1e-2, attn_dim=16,
                          progress=False, out=tmp_path / "r", seed=1, resume=True)
    with pytest.raises(ValueError, match="resume need out"):
        _train(None, True, resume=True)


def test_non_finite_loss_skips_the_step_and_is_counted(tmp_path, monkeypatch):
    calls = []
    real = srm_loop._bt_terms

    def poisoned(rc, rr, l2):
        calls.append(1)
        out = real(rc, rr, l2)
        return out * float("nan") if len(calls) == 1 else out
    monkeypatch.setattr(srm_loop, "_bt_terms", poisoned)
    rm, hist = _train(tmp_path / "n", True, epochs=1, plot=True)
    assert [h["skipped"] for h in hist] == [1, 1]
    assert all(bool(t.isfinite().all()) for t in rm.head.state_dict().values())
    assert (tmp_path / "n" / "curves.png").stat().st_size > 1000
    history = [json.loads(x) for x in (tmp_path / "n" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2


def test_a_checkpoint_never_holds_non_finite_weights(tmp_path):
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    rm = SentenceRM(model, tok, attn_dim=16)
    fwd = srm_loop.par.SRMForward(rm)
    rm.backbone.requires_grad_(False)
    opt = torch.optim.AdamW(rm.head.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with torch.no_grad():
        rm.head.value.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite values in model/rm.head.value.weight"):
        srm_checkpoint.save(tmp_path / "ck", fwd, opt, sched, {"step": 1})
    assert not srm_checkpoint.exists(tmp_path / "ck")


def test_lora_trains_only_adapters_and_head_and_reloads(tmp_path):
    pytest.importorskip("peft")
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    real = srm_loop.Trainer._step

    def step(self, group, count):
        out = real(self, group, count)
        seen.setdefault("trainable", sorted(n for n, p in self.fwd.named_parameters()
                                            if p.requires_grad))
        return out
    srm_loop.Trainer._step = step
    try:
        rm, hist = train_sentence_rm(PAIRS, model=model, tokenizer=tok, lora_rank=2, epochs=2,
                                     batch_size=2, lr=1e-2, attn_dim=16, progress=False,
                                     out=tmp_path / "lora", save_every=1)
    finally:
        srm_loop.Trainer._step = real
    names = seen["trainable"]
    assert names and all("lora_" in n or n.startswith("rm.head.") for n in names)
    assert any("lora_" in n for n in names) and "rm.head.query.weight" in names
    index = json.loads((tmp_path / "lora" / "checkpoint" / "checkpoint.json").read_text())
    assert index["fingerprint"]["config"]["lora_rank"] == 2
    assert rm.backbone_tuned
    merged = srm_lora.merged(rm.backbone).state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in merged.items() if k in before)
    loaded = SentenceRM.from_pretrained(tmp_path / "lora", device="cpu")
    prompts, resps = [p["prompt"] for p in PAIRS], [p["chosen"] for p in PAIRS]
    torch.testing.assert_close(loaded.score(prompts, resps), rm.score(prompts, resps),
                               rtol=1e-5, atol=1e-5)


def test_cli_checks_the_new_options(tmp_path):
    from erm.cli.options import CLIError
    from erm.cli.train_srm import add_parser

    parser = argparse.ArgumentParser(prog="erm")
    add_parser(parser.add_subparsers(dest="command"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    base = ["train-srm", "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu"]
    for extra, match in ((["--fsdp"], "torchrun"), (["--save-every", "0"], "--save-every"),
                         (["--lora-rank", "2", "--freeze-backbone"], "--lora-rank")):
        args = parser.parse_args(base + extra)
        with pytest.raises(CLIError, match=match):
            args.func(args)


def test_lora_on_a_named_base_saves_the_adapter_alone(tmp_path):
    pytest.importorskip("peft")
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rm, _ = train_sentence_rm(PAIRS, model=str(tmp_path / "base"), lora_rank=2, epochs=1,
                              batch_size=2, lr=1e-2, attn_dim=16, progress=False,
                              out=tmp_path / "srm")
    files = sorted(p.name for p in (tmp_path / "srm").iterdir())
    assert "adapter" in files and "backbone" not in files
    cfg = json.loads((tmp_path / "srm" / "sentence_rm.json").read_text())
    assert cfg["adapter"] == "adapter" and cfg["backbone_tuned"] and not cfg["backbone_saved"]
    loaded = SentenceRM.from_pretrained(tmp_path / "srm", device="cpu")
    prompts, resps = [p["prompt"] for p in PAIRS], [p["rejected"] for p in PAIRS]
    torch.testing.assert_close(loaded.score(prompts, resps), rm.score(prompts, resps),
                               rtol=1e-5, atol=1e-5)
