"""Vocab-parallel ops (erm/distributed.py) on CPU with gloo: each worker process holds a shard of
the vocabulary; its values and gradients must equal the single-process ops on the full
vocabulary (the reference every worker also computes, from the same seed)."""
import os
import socket
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import erm
from erm.ops.vocab_parallel import (vocab_parallel_endogenous_rewards,
                                    vocab_parallel_linear_token_stats, vocab_parallel_token_stats)

V, N, D = 37, 6, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slices(world: int):
    """Uneven vocabulary slices [(start, size)] covering V."""
    cuts = [0] + [round(V * (k + 1) / world) + (1 if k % 2 == 0 and k + 1 < world else 0)
                  for k in range(world)]
    cuts[-1] = V
    return [(cuts[k], cuts[k + 1] - cuts[k]) for k in range(world)]


def _close(got, want, tol):
    got, want = got.double(), want.double()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1.0)
    assert err <= tol, (err, tol)


def _check_logits_op(rank, world, dtype, offset, tol):
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(N, V, generator=g) * 3 + offset).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[1] = -100
    w = [torch.randn(N, generator=g) for _ in range(4)]
    start, size = _slices(world)[rank]
    full = z.clone().requires_grad_(True)
    ref = erm.token_stats(full, t, temperature=0.7, entropy=True, backend="torch")
    sum((o * wk).sum() for o, wk in zip(ref, w)).backward()
    local = z[:, start:start + size].clone().requires_grad_(True)
    got = vocab_parallel_token_stats(local, t, vocab_start=start, temperature=0.7, entropy=True,
                                     backend="torch")
    sum((o * wk).sum() for o, wk in zip(got, w)).backward()
    for a, b in zip(got, ref):
        _close(a, b, tol)
    assert (got.logprob <= 0).all()
    _close(local.grad, full.grad[:, start:start + size], tol)


def _check_linear_op(rank, world, tol=1e-5):
    g = torch.Generator().manual_seed(12)
    h = torch.randn(2, 3, D, generator=g)
    wt = torch.randn(V, D, generator=g)
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (2, 3), generator=g)
    wts = [torch.randn(2, 3, generator=g) for _ in range(4)]
    start, size = _slices(world)[rank]
    fh, fw, fb = (x.clone().requires_grad_(True) for x in (h, wt, b))
    ref = erm.linear_token_stats(fh, fw, t, bias=fb, entropy=True, backend="torch")
    sum((o * k).sum() for o, k in zip(ref, wts)).backward()
    lh = h.clone().requires_grad_(True)
    lw = wt[start:start + size].clone().requires_grad_(True)
    lb = b[start:start + size].clone().requires_grad_(True)
    got = vocab_parallel_linear_token_stats(lh, lw, t, vocab_start=start, bias=lb, entropy=True,
                                            backend="torch")
    sum((o * k).sum() for o, k in zip(got, wts)).backward()
    for a, r in zip(got, ref):
        _close(a, r, tol)
    _close(lh.grad, fh.grad, tol)
    _close(lw.grad, fw.grad[start:start + size], tol)
    _close(lb.grad, fb.grad[start:start + size], tol)


def _check_rewards(rank, world):
    g = torch.Generator().manual_seed(13)
    z = torch.randn(2, 5, V, generator=g) * 2
    ids = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    ref = erm.endogenous_rewards(z, ids, response_mask=mask, alpha=0.9, gamma=0.95,
                                 terminated=[True, False], backend="torch")
    start, size = _slices(world)[rank]
    got = vocab_parallel_endogenous_rewards(z[..., start:start + size], ids, vocab_start=start,
                                            response_mask=mask, alpha=0.9, gamma=0.95,
                                            terminated=[True, False], backend="torch")
    _close(got, ref, 1e-5)


def _check_bad_target(rank, world):
    start, size = _slices(world)[rank]
    with pytest.raises(ValueError, match="no rank's vocabulary slice"):
        vocab_parallel_token_stats(torch.randn(2, size), torch.tensor([0, V + 3]),
                                   vocab_start=start, backend="torch")


def _check_infinite(rank, world):
    """+inf logits in one shard or two, an all −inf row: the single-process semantics."""
    z = torch.randn(4, V, generator=torch.Generator().manual_seed(14))
    z[0, 3] = z[0, V - 2] = float("inf")      # +inf in the first and the last shard
    z[1, 5] = float("inf")                     # +inf in the first shard only
    z[2] = float("-inf")                       # no distribution: NaN statistics
    z[3, 7] = float("-inf")
    t = torch.tensor([3, V - 1, 0, 7])
    ref = erm.token_stats(z, t, entropy=True, backend="torch")
    start, size = _slices(world)[rank]
    got = vocab_parallel_token_stats(z[:, start:start + size], t, vocab_start=start,
                                     entropy=True, backend="torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5)


def _same_error_everywhere(exc_type, match, call):
    """`call()` raises `exc_type` matching `match` on this rank; the message is then gathered
    from every rank and must be identical."""
    with pytest.raises(exc_type, match=match) as info:
        call()
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, str(info.value))
    assert len(set(got)) == 1, got


def _check_bad_layouts(rank, world):
    """Slices with a gap, overlapping slices, a rank with another temperature, an empty slice,
    one rank's bad argument: every rank raises the same error (none waits on a lost peer)."""
    z = torch.randn(3, V, generator=torch.Generator().manual_seed(15))
    t = torch.tensor([0, 5, V - 1])
    slices = _slices(world)
    start, size = slices[rank]

    def stats(lo, n, **kw):
        return lambda: vocab_parallel_token_stats(z[:, lo:lo + n], t, vocab_start=lo,
                                                  backend="torch", **kw)
    last = world - 1
    gap = stats(start + 1, size - 1) if rank == last else stats(start, size)
    _same_error_everywhere(ValueError, rf"ids \[{slices[last][0]}, {slices[last][0] + 1}\) are "
                           r"in no slice", gap)
    over = stats(start - 2, size + 2) if rank == last else stats(start, size)
    _same_error_everywhere(ValueError, "are in two slices", over)
    hot = stats(start, size, temperature=0.5 if rank == 0 else 1.0)
    _same_error_everywhere(ValueError, r"temperature must be the same on every rank, got "
                           r"\[0.5, 1.0", hot)
    empty = stats(start, 0) if rank == 1 else stats(start, size)
    _same_error_everywhere(ValueError, "rank 1: this rank's vocabulary slice is empty", empty)
    bad = stats(start, size, temperature=-1.0 if rank == last else 1.0)
    _same_error_everywhere(ValueError, f"rank {last}: temperature must be", bad)
    wrong = (lambda: vocab_parallel_token_stats(z[:, start:start + size].long(), t,
                                                vocab_start=start)) if rank == 0 else \
        stats(start, size)
    _same_error_everywhere(TypeError, "rank 0: logits must be float32", wrong)
    h, w = torch.randn(3, D), torch.randn(V, D)
    lin = vocab_parallel_linear_token_stats(h, w[start:start + size], t, vocab_start=start,
                                            backend="torch")
    assert torch.isfinite(lin.lse).all()  # the group still works after the errors
    _same_error_everywhere(ValueError, "rank 0: this rank's vocabulary slice is empty", lambda:
                           vocab_parallel_linear_token_stats(
                               h, w[start:start + (0 if rank == 0 else size)], t,
                               vocab_start=start, backend="torch"))
    rw = (lambda: vocab_parallel_endogenous_rewards(
        z[None, :, start:start + size], t[None], vocab_start=start, backend="torch",
        alpha=0.9 if rank == last else 1.0))
    _same_error_everywhere(ValueError, "temperature must be the same on every rank", rw)


def _worker(rank, world, port, checks):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank that fails leaves the others in a collective: the timeout turns that into an error
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for name, args in checks:
            globals()[name](rank, world, *args)
        dist.barrier()  # no rank tears down gloo while another still uses it
    finally:
        dist.destroy_process_group()
    # a clean exit without the interpreter's teardown, where gloo's threads now and then abort
    # the process ("terminate called without an active exception") after all checks passed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world, checks):
    mp.spawn(_worker, args=(world, _free_port(), checks), nprocs=world, join=True)


def test_two_ranks_equal_one_process():
    _spawn(2, [("_check_logits_op", (torch.float32, 0.0, 1e-5)),
               ("_check_logits_op", (torch.float32, 1e4, 1e-5)),
               ("_check_logits_op", (torch.bfloat16, 0.0, 2e-2)),
               ("_check_linear_op", ()), ("_check_rewards", ()), ("_check_infinite", ()),
               ("_check_bad_target", ())])


def test_three_uneven_ranks_equal_one_process():
    _spawn(3, [("_check_logits_op", (torch.float32, -3e3, 1e-5)), ("_check_linear_op", ())])


def test_vocab_parallel_ranks_that_disagree_all_raise_the_same_error():
    """One all-gather of (vocab_start, size, α) lets every rank see a bad layout or one rank's
    bad argument, and raise the same error: no rank is left waiting in a collective."""
    _spawn(3, [("_check_bad_layouts", ())])


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_token_stats(torch.randn(2, 5), torch.tensor([0, 1]), vocab_start=0)


def _one_and_two_ranks(tmp_path, arch, seed, data, command, out_suffix):
    """Save a tiny model, run `python -m erm -q COMMAND --data DATA --model M` once in one
    process and once under `torchrun --nproc-per-node 2`; returns the torchrun run's stdout
    after both succeeded; their outputs are tmp_path/one.SUFFIX and two.SUFFIX."""
    import subprocess
    import sys

    from tests.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(arch, seed=seed)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["-m", "erm", "-q", command, "--data", str(data), "--model", str(tmp_path / "m")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable] + args + ["--out", str(tmp_path / f"one{out_suffix}")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2"] + args
                         + ["--out", str(tmp_path / f"two{out_suffix}")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    return two.stdout


def test_torchrun_score_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m erm score` writes what one process writes."""
    import json

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": "Answer " * (i % 4 + 1),
                                        "id": i}) + "\n" for i in range(11)))
    _one_and_two_ranks(tmp_path, "qwen2", 5, data, "score", ".jsonl")
    a = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["id"] for r in b] == list(range(11))
    for x, y in zip(a, b):
        assert abs(x["reward"] - y["reward"]) <= 1e-4 * max(1.0, abs(x["reward"]))
    assert not list(tmp_path.glob("two.jsonl.part-*"))


class _LenRM:
    """A stand-in reward model for the command line: reward = len(response) (+ `offset`), with
    the `erm.scoring.Scorer` attributes of an EndoRM (no causal LM behind it)."""

    kind, label, reductions, cuts_prompts = "endorm", "EndoRM", ("sum", "mean"), True
    batch_size = 2
    max_length = system_prompt = tokenizer = causal_lm = None

    def check_pair(self, prompt, response, *, system_prompt=None, truncate=True):
        pass

    def __init__(self, offset=0.0):
        self.offset, self.calls = offset, []

    def response_rewards(self, prompts, responses, *, system_prompt=None, progress=None,
                         truncate=True):
        self.calls.append(len(responses))
        return (torch.tensor([len(r) + self.offset for r in responses]),
                torch.ones(len(responses), dtype=torch.int64))

    def score(self, prompts, responses, *, reduction="sum", **kw):
        return self.response_rewards(prompts, responses)[0]


def _private_parts(rank):
    """Each rank sees only its own part files, as on nodes without a shared file system."""
    from erm import dp

    seen = dp.parts
    dp.parts = lambda out: [p for p in seen(out) if p.name.endswith(f".part-{rank}")]


def _cli_worker(rank, world, port, argv, check, result):
    """One torchrun-like rank running `erm` in-process on a stand-in model; `check` (a function
    of this module) prepares the rank; its exit status and the model's call sizes go to `result`."""
    from erm import cli

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    rm = _LenRM()
    try:
        globals()[check](rank)
        rc = cli.main(["-q"] + argv, rm=rm)
        result.put((rank, rc, sum(rm.calls)))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_cli(world, argv, check="_private_parts"):
    """{rank: (exit status, rows scored)} of `erm argv` on `world` spawned gloo ranks."""
    ctx = mp.get_context("spawn")
    result = ctx.SimpleQueue()
    mp.spawn(_cli_worker, args=(world, _free_port(), argv, check, result), nprocs=world,
             join=True)
    got = {}
    while not result.empty():
        rank, rc, n = result.get()
        got[rank] = (rc, n)
    return got


def test_score_needs_no_shared_file_system(tmp_path):
    """The scores reach rank 0 through the process group, not through the other ranks' part
    files; --resume pools the parts each rank sees."""
    import json

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": "ab" * (i + 1)}) + "\n"
                            for i in range(9)))
    out = tmp_path / "out.jsonl"
    got = _run_cli(2, ["score", "--data", str(data), "--out", str(out)])
    assert got == {0: (0, 4), 1: (0, 5)}
    assert [json.loads(x)["reward"] for x in out.read_text().splitlines()] == \
        [2.0 * (i + 1) for i in range(9)]
    assert not list(tmp_path.glob("out.jsonl.part-*"))
    # a crashed three-rank run left each node its own part: rank 1's part is on node 1 only
    header = json.dumps({"erm_part": 1, "fingerprint": None})
    row = json.dumps({"index": 7, "value": -1.0})
    (tmp_path / "out.jsonl.part-1").write_text(f"{header}\n{row}\n")
    got = _run_cli(2, ["score", "--data", str(data), "--out", str(out), "--resume"],
                   check="_resume_fingerprint")
    assert got == {0: (0, 4), 1: (0, 4)}  # row 7 is not scored again
    rewards = [json.loads(x)["reward"] for x in out.read_text().splitlines()]
    assert rewards == [-1.0 if i == 7 else 2.0 * (i + 1) for i in range(9)]


def _resume_fingerprint(rank):
    """Private parts, and rank 1's part header written with this run's fingerprint."""
    import json

    from pathlib import Path

    from erm.cli import score as cli

    _private_parts(rank)
    seen = cli._score_fingerprint
    if rank == 1:
        def stamp(args, rm, field, given):
            fp = seen(args, rm, field, given)
            part = Path(f"{args.out}.part-1")
            lines = part.read_text().splitlines()
            head = json.dumps({"erm_part": 1, "fingerprint": fp})
            part.write_text("\n".join([head] + lines[1:]) + "\n")
            return fp
        cli._score_fingerprint = stamp


def test_rewardbench_eval_is_sharded(tmp_path):
    """`erm eval` on a RewardBench file: every rank scores a shard, rank 0 reports all."""
    import json

    rows = [{"prompt": f"Q{i}?", "chosen": "x" * (i + 2), "rejected": "y" * (3 if i % 2 else 9),
             "subset": ["alpacaeval-easy", "math-prm", "hep-go"][i % 3], "id": i}
            for i in range(7)]
    data = tmp_path / "rb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = _run_cli(2, ["eval", "--data", str(data), "--out", str(tmp_path / "two.json")],
                   check="_no_change")
    assert got == {0: (0, 6), 1: (0, 8)}  # 3 + 4 pairs, chosen and rejected each
    from erm import cli

    assert cli.main(["-q", "eval", "--data", str(data), "--out", str(tmp_path / "one.json")],
                    rm=_LenRM()) == 0
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.pop("seconds") >= 0 and two.pop("seconds") >= 0
    assert one == two


def _no_change(rank):
    pass


# ------------------------------------------------------------------ the RL loop under DDP (gloo)
def _rl_batch(tok, n_prompts=2, k=2):
    """A hand-made rollout of n_prompts × k samples (groups contiguous), responses of lengths
    1–5, some terminated."""
    from erm import rl
    prompts = [f"What is {i} plus {i}?" for i in range(n_prompts) for _ in range(k)]
    ids, attn = rl.encode_prompts(tok, prompts)
    g = torch.Generator().manual_seed(3)
    b = len(prompts)
    resp = torch.randint(10, len(tok) - 10, (b, 5), generator=g)
    lens = torch.tensor([1 + (3 * i) % 5 for i in range(b)])
    mask = torch.arange(5)[None] < lens[:, None]
    resp = torch.where(mask, resp, torch.full_like(resp, tok.pad_token_id))
    return rl.Rollout(torch.cat([ids, resp], 1), torch.cat([attn, mask.long()], 1), ids.shape[1],
                      mask, torch.arange(b) % 2 == 0, [None] * b, [""] * b)


def _full(p):
    """A parameter as a plain tensor (an FSDP shard gathered)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _check_rl_update(rank, world, wrap="ddp", tie=False):
    """Given the same rollouts, one update (2 PPO epochs, micro-batches of 1) on each rank's
    groups under DDP or FSDP2 gives the loss, metrics and weights of one process on the whole
    batch."""
    import copy

    from erm import dp as erm_dp, rl
    from tests.tiny import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer("llama", seed=0, tie=tie)
    cfg = rl.RLConfig(prompts_per_step=world, k=2, lr=0.1, ppo_epochs=2, micro_batch=1,
                      kl_coef=0.1, entropy_coef=0.01, progress=False)
    batch = _rl_batch(tok, n_prompts=world, k=2)
    ref_lp, tok_r = rl.score(copy.deepcopy(model), batch, alpha=1.0)
    adv, _ = rl.advantages(cfg, tok_r, batch.response_mask, torch.zeros(len(batch.texts)))
    one = copy.deepcopy(model).requires_grad_(True)
    m1 = rl.update(one, torch.optim.SGD(one.parameters(), lr=cfg.lr), batch, adv, ref_lp, cfg)
    dp = copy.deepcopy(model).requires_grad_(True)
    i, j = 2 * rank, 2 * rank + 2   # this rank's group
    wrapped = (erm_dp.wrap_fsdp if wrap == "fsdp" else erm_dp.wrap_ddp)(dp)
    if wrap == "fsdp":   # the parameters are this rank's shards now
        assert all(hasattr(q, "full_tensor") for q in dp.parameters())
    m2 = rl.update(wrapped, torch.optim.SGD(dp.parameters(), lr=cfg.lr),
                   rl._slice(batch, i, j), adv[i:j], ref_lp[i:j], cfg)
    for key in ("loss", "loss_last", "kl", "entropy", "ratio", "clip_frac", "grad_norm"):
        assert abs(m1[key] - m2[key]) <= 1e-5 * max(1.0, abs(m1[key])), (key, m1[key], m2[key])
    assert m1["loss"] != m1["loss_last"]                     # the first epoch moved the policy
    n = 0
    for (name, p), q in zip(one.named_parameters(), dp.parameters()):
        _close(_full(q), p.detach(), 1e-6)
        n += 1
    assert n == len(list(one.parameters()))


def _check_rl_two_steps(rank, world, out, fsdp=False):
    """`Trainer` under DDP or FSDP2: two steps complete, the ranks hold the same weights, rank 0
    writes the log, the checkpoint and the summary; under FSDP the ranks decode different
    numbers of tokens in step, and a resumed run continues from the full checkpoint."""
    from erm import rl
    from tests.tiny import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer("qwen2", seed=0)
    prompts = [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(6)]
    cfg = rl.RLConfig(steps=2, prompts_per_step=world, k=2, max_new_tokens=4, lr=1e-3,
                      out=out, progress=False, eval_prompts=3, eval_max_new_tokens=3,
                      fsdp=fsdp)
    summary = rl.Trainer(cfg, model, tok, train_prompts=prompts, eval_prompts=prompts[:3]).train()
    assert [r["step"] for r in summary["steps"]] == [1, 2]
    flat = torch.cat([_full(p).reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, flat) for g in gathered)
    dist.barrier()
    if rank == 0:
        assert "accuracy_after" in summary
        names = sorted(p.name for p in __import__("pathlib").Path(out).iterdir())
        assert names == ["checkpoint-2.pt", "checkpoint.json", "log.jsonl", "summary.json"], names
    if fsdp:  # the checkpoint is full: a third step resumes from it on every rank
        dist.barrier()
        ck = torch.load(f"{out}/checkpoint-2.pt", weights_only=True)
        assert all(not hasattr(v, "full_tensor") for v in ck["policy"].values())
        _close(ck["policy"]["model.norm.weight"], _full(model.model.norm.weight), 0.0)
        model2, _ = tiny_model_and_tokenizer("qwen2", seed=0)
        cfg3 = rl.RLConfig(**{**__import__("dataclasses").asdict(cfg), "steps": 3,
                              "resume": True})
        tr = rl.Trainer(cfg3, model2, tok, train_prompts=prompts, eval_prompts=prompts[:3])
        assert tr.step_idx == 2
        _close(_full(model2.model.norm.weight), _full(model.model.norm.weight), 0.0)
        steps = [r["step"] for r in tr.train()["steps"]]
        assert steps == ([1, 2, 3] if rank == 0 else [3]), steps   # rank 0 reads the log back


def test_rl_update_under_ddp_equals_one_process(tmp_path):
    _spawn(2, [("_check_rl_update", ()), ("_check_rl_two_steps", (str(tmp_path / "run"),))])


@pytest.mark.skipif(not __import__("erm.dp").dp.fsdp_on_cpu(),
                    reason="this torch's FSDP2 cannot run on the CPU")
def test_rl_update_under_fsdp_equals_one_process(tmp_path):
    """FSDP2 (`--fsdp`): an untied and a tied LM head; sharded sampling, evaluation,
    checkpoint and resume."""
    _spawn(2, [("_check_rl_update", ("fsdp",)), ("_check_rl_update", ("fsdp", True)),
               ("_check_rl_two_steps", (str(tmp_path / "run"), True))])


def test_torchrun_eval_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m erm eval` reports what one process reports."""
    import json

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "Yes " * (i % 3 + 1),
                                        "rejected": "No", "subset": "ab"[i % 2]}) + "\n"
                            for i in range(7)))
    out = _one_and_two_ranks(tmp_path, "llama", 6, data, "eval", ".json")
    assert out.count("erm eval:") == 1                           # rank 0 alone prints
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (a["n"], a["subsets"]) == (b["n"], b["subsets"])
    assert a["methods"].keys() == b["methods"].keys()
    for m in a["methods"]:
        assert a["methods"][m]["accuracy"] == b["methods"][m]["accuracy"], m
        assert a["methods"][m]["subsets"] == b["methods"][m]["subsets"], m
    assert [r["index"] for r in b["pairs"]] == list(range(7))
    for x, y in zip(a["pairs"], b["pairs"]):
        for m, (c, r) in x["scores"].items():
            assert abs(c - y["scores"][m][0]) <= 1e-4 * max(1.0, abs(c)), m
            assert abs(r - y["scores"][m][1]) <= 1e-4 * max(1.0, abs(r)), m


def test_endorm_scores_a_model_sharded_with_a_device_map():
    """A model dispatched by accelerate over a device_map scores as the whole model does (on a
    CPU-only machine both shards are CPU; the map names two devices, as over two GPUs)."""
    from accelerate import dispatch_model

    from tests.tiny import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer("llama", seed=7)
    prompts, responses = ["Hi?", "What is 2 plus 2?"], ["Hello there.", "4"]
    want = erm.EndoRM(model, tok).score(prompts, responses, progress=False)
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    dmap = {"model.embed_tokens": dev, "model.rotary_emb": dev, "model.layers.0": dev,
            "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    sharded = dispatch_model(model, device_map=dmap)
    sharded.hf_device_map = {**dmap, "lm_head": 1 if dev == "cpu" else "cpu"}  # two devices
    rm = erm.EndoRM(sharded, tok)
    assert rm.fused is False and rm.device == torch.device(dev)
    got = rm.score(prompts, responses, progress=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
