"""`erm.train_sentence_rm` data-parallel on CPU with gloo: one optimizer step on 2 ranks (DDP,
FSDP2; tied and untied LM heads; frozen and full backbone) equals one process on the whole batch
(loss, metrics, gradient norm, weights), and a run resumed from a checkpoint ends where an
uninterrupted one does (FSDP2: the checkpoint gathered from the shards)."""
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from erm import dp, train_sentence_rm
from tests.tiny import SRM_PAIRS

PAIRS = SRM_PAIRS + [
    {"prompt": "Hi", "chosen": "Good. Fine!", "rejected": "The fox."},
]
CASES = [(tie, frozen) for tie in (False, True) for frozen in (True, False)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tie: bool, frozen: bool, fsdp: bool = False, seen=None, **kw):
    from tests.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer("llama", seed=0, tie=tie)
    if seen is not None:  # the sequences this rank's backbone runs
        model.get_decoder().register_forward_hook(
            lambda m, a, o: seen.append(o.last_hidden_state.shape[0]))
    args = dict(model=model, tokenizer=tok, freeze_backbone=frozen, epochs=1,
                batch_size=len(PAIRS), lr=1e-6, head_lr=1e-6, warmup_ratio=0.0,
                attn_dim=16, progress=False, fsdp=fsdp, eval_pairs=PAIRS[:3], seed=3)
    args.update(kw)
    return train_sentence_rm(PAIRS, **args)


def _weights(rm) -> dict:
    return {k: v.detach().float().clone() for k, v in rm.state_dict().items()}


def _record(path, rm, hist) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _weights(rm).items()}, f"{path}.safetensors")
    with open(f"{path}.json", "w") as f:
        json.dump(hist, f)


def _worker(rank, world, port, out, fsdp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(100 + rank)  # the run must not depend on the ranks' own RNG states
    try:
        for tie, frozen in CASES:
            seen = []
            rm, hist = _train(tie, frozen, fsdp, seen=seen)
            assert (rm is None) == (fsdp and rank != 0)
            if frozen and not fsdp:  # each rank cached its own pairs and eval pairs only
                own = len(dp.shard(len(PAIRS), rank, world))
                assert sum(seen) == 2 * own + 2 * len(dp.shard(3, rank, world)), seen
            if rank == 0:
                _record(os.path.join(out, f"{int(tie)}{int(frozen)}"), rm, hist)
        if fsdp:  # a checkpoint gathered from the shards, resumed
            _resume_case(out, rank, fsdp=True)
    finally:
        dist.destroy_process_group()


def _resume_case(out, rank, fsdp=False):
    """2 epochs of 2 steps with a checkpoint every step: stopped at the end of epoch 1 (after
    the step-1 checkpoint) and resumed, then the same run uninterrupted."""
    base = dict(batch_size=3, epochs=2, lr=1e-3, head_lr=1e-2, save_every=1, eval_pairs=None)

    def stop(summary):
        raise KeyboardInterrupt

    run = os.path.join(out, "run")
    with pytest.raises(KeyboardInterrupt):
        _train(False, False, fsdp, out=run, on_epoch=stop, **base)
    dp.barrier()
    index = json.loads(open(os.path.join(run, "checkpoint", "checkpoint.json")).read())
    assert index["step"] == 1 and len(index["history"]) == 1
    rm, hist = _train(False, False, fsdp, out=run, resume=True, **base)
    if rank == 0:
        _record(os.path.join(out, "resumed"), rm, hist)
    rm, hist = _train(False, False, fsdp, out=os.path.join(out, "full"), **base)
    if rank == 0:
        _record(os.path.join(out, "uninterrupted"), rm, hist)


def _spawn(tmp_path, fsdp):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), fsdp), nprocs=2, join=True)


def _load(path):
    from safetensors.torch import load_file

    return load_file(f"{path}.safetensors"), json.loads(open(f"{path}.json").read())


def _compare(tmp_path):
    for tie, frozen in CASES:
        got_w, got_h = _load(tmp_path / f"{int(tie)}{int(frozen)}")
        rm, hist = _train(tie, frozen)
        assert len(hist) == len(got_h) == 1
        for key in ("loss", "accuracy", "margin", "grad_norm", "eval_accuracy", "eval_loss"):
            assert got_h[0][key] == pytest.approx(hist[0][key], rel=1e-5, abs=1e-6), \
                (tie, frozen, key)
        assert got_h[0]["pairs"] == hist[0]["pairs"] == len(PAIRS)
        want = _weights(rm)
        assert set(got_w) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(got_w[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_ddp_step_equals_one_process(tmp_path):
    _spawn(tmp_path, False)
    _compare(tmp_path)


@pytest.mark.skipif(not dp.fsdp_on_cpu(), reason="this torch's FSDP2 does not run on the CPU")
def test_fsdp_step_equals_one_process_and_resumes(tmp_path):
    _spawn(tmp_path, True)
    _compare(tmp_path)
    got_w, got_h = _load(tmp_path / "resumed")
    want_w, want_h = _load(tmp_path / "uninterrupted")
    assert [h["step"] for h in got_h] == [1, 2, 3, 4]
    assert [h["loss"] for h in got_h] == pytest.approx([h["loss"] for h in want_h], rel=1e-6)
    for k, v in want_w.items():
        torch.testing.assert_close(got_w[k], v, rtol=1e-6, atol=1e-6, msg=k)
