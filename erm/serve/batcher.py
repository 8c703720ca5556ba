"""The reward server's batching: `RewardServer` queues the requests (`Job`s), gathers those that
arrive within `max_wait_ms` (up to `max_batch_size` pairs) and scores them together in one worker
thread off the event loop — encoded, sorted by length, one forward per `max_batch_size` pairs —
then answers each request in its own order."""
import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence

from .. import lm
from .._checks import check_int
from ..model import reduce_rewards
from .protocol import Job, RequestError

log = logging.getLogger("erm.serve")


class _Scorer:
    """Encodes and scores batches of jobs; runs in the one worker thread only."""

    def __init__(self, rm, max_batch_size: int, reduction: str, truncate: bool):
        self.rm = rm
        self.max_batch_size = max_batch_size
        self.reduction = reduction
        self.truncate = truncate

    # -- encoding
    def _encode_score(self, job: Job) -> List[lm.Encoded]:
        encs = []
        for i, (p, r, t) in enumerate(zip(job.prompts, job.responses, job.terminated)):
            try:
                enc = self.rm.encode(p, r, terminated=t)
            except (TypeError, ValueError) as exc:
                raise RequestError(f"pair {i}: {exc}") from None
            self._check_cut(enc, i)
            encs.append(enc)
        return encs

    def _check_cut(self, enc: lm.Encoded, i: int) -> None:
        if enc.n_cut and not self.truncate:
            raise RequestError(f"pair {i}: the prompt is {enc.n_cut} token(s) too long for "
                               f"max_length={self.rm.max_length}")

    def _encode_raw(self, job: Job) -> List[Optional[lm.Encoded]]:
        """Prompt and response text tokenized as they are (OpenRLHF sends rendered text)."""
        rm, tok = self.rm, self.rm.tokenizer
        ends = set(rm.end_ids)
        pad = lm.pad_id(tok, rm.end_ids)
        encs = []
        for i, (p, r) in enumerate(zip(job.prompts, job.responses)):
            resp = lm.tokenize(tok, r)[0] if r else []
            while resp and resp[-1] == pad and pad not in ends:
                resp.pop()
            if not resp:
                encs.append(None)  # an empty response: reward 0
                continue
            ctx = lm.tokenize(tok, p)[0] if p else []
            try:
                enc = lm.join_context(tok, ctx, resp, end_ids=rm.end_ids,
                                      max_length=rm.max_length, terminated=resp[-1] in ends)
            except ValueError as exc:
                raise RequestError(f"query {i}: {exc}") from None
            self._check_cut(enc, i)
            encs.append(enc)
        return encs

    # -- scoring
    def _rewards(self, encs: List[lm.Encoded]):
        """Per-token reward tensors of each encoded pair, in order: sorted by length, one
        forward per max_batch_size pairs."""
        out = [None] * len(encs)
        for idx in lm.length_batches([len(e.ids) for e in encs], self.max_batch_size):
            rewards, _, _ = self.rm.encoded_stats([encs[i] for i in idx])
            for i, r in zip(idx, rewards):
                out[i] = r
        return out

    def run(self, jobs: Sequence[Job]) -> list:
        """One result (a dict) or exception per job."""
        results: list = [None] * len(jobs)
        encoded = []
        for k, job in enumerate(jobs):
            try:
                encoded.append(self._encode_score(job) if job.kind == "score"
                               else self._encode_raw(job))
            except RequestError as exc:
                results[k] = exc
                encoded.append([])
        flat = [e for k, encs in enumerate(encoded) if results[k] is None
                for e in encs if e is not None]
        try:
            rewards = iter(self._rewards(flat)) if flat else iter(())
        except Exception as exc:  # the model failed: every request of the batch gets it
            log.exception("scoring failed")
            return [r if r is not None else exc for r in results]
        for k, (job, encs) in enumerate(zip(jobs, encoded)):
            if results[k] is None:
                results[k] = self._answer(job, encs,
                                          [next(rewards) if e is not None else None for e in encs])
        return results

    def _answer(self, job: Job, encs: List[Optional[lm.Encoded]], per: list) -> dict:
        """The JSON answer of one job from its per-token reward tensors (None: an empty
        response); logs a warning when prompts of the job were cut to fit max_length."""
        import torch

        # as EndoRM.score: the sum in float64, stored as float32; the mean from that float32
        sums = torch.tensor([float(r.sum(dtype=torch.float64)) if r is not None else 0.0
                             for r in per], dtype=torch.float32)
        lengths = [r.numel() if r is not None else 0 for r in per]
        reduction = job.reduction if job.kind == "score" else self.reduction
        vals = reduce_rewards(sums, torch.tensor(lengths), reduction).tolist()
        cut = [e.n_cut if e is not None else 0 for e in encs]
        if any(cut):
            log.warning("%s: %d of %d prompt(s) cut from the left to fit max_length=%d (up to "
                        "%d tokens dropped; first: item %d)",
                        "/score" if job.kind == "score" else "/get_reward",
                        sum(1 for c in cut if c), len(cut), self.rm.max_length, max(cut),
                        next(i for i, c in enumerate(cut) if c))
        if job.kind == "score":
            res = {"rewards": vals, "prompt_truncated": [c > 0 for c in cut]}
            if job.token_rewards:
                res["token_rewards"] = [r.tolist() for r in per]
            return res
        return {"rewards": vals, "scores": vals,
                "extra_logs": {"response_tokens": lengths,
                               "terminated": [int(e.terminated) if e is not None else 1
                                              for e in encs],
                               "prompt_truncated": [int(c > 0) for c in cut]}}


class RewardServer:
    """The state behind the app: the model (or how to load it), the batching queue and the worker.

    Args:
        rm: an `erm.EndoRM`, or a zero-argument callable returning one (run in the worker thread
            at start-up; /health answers 503 until it returns).
        max_batch_size: most pairs scored together (and per forward pass).
        max_wait_ms: how long the first request of a batch waits for others.
        reduction: reduction of `/get_reward` ("sum" or "mean").
        truncate: cut prompts longer than the model's max_length from the left (False: 422).
        threads: torch intra-op threads of the worker (None: torch's default). On a CPU shared
            with other jobs, 1 avoids OpenMP threads waiting on each other (measured on a busy
            2-core machine: 0.15 s per SmolLM2-135M pair with 1 thread, 4 s with 2).
    """

    def __init__(self, rm, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 reduction: str = "sum", truncate: bool = True, name: Optional[str] = None,
                 threads: Optional[int] = None):
        check_int(max_batch_size, "max_batch_size", 1)
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self._source = rm
        self.rm = None if callable(rm) and not hasattr(rm, "score") else rm
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.reduction = reduction
        self.truncate = truncate
        self.name = name
        self.threads = threads
        self.load_error: Optional[BaseException] = None
        self.on_load_error: Optional[Callable[[BaseException], None]] = None
        self.batches = 0          # batches scored (for tests and logs)
        self._executor = None
        self._queue = None
        self._task = None
        self._ready = None
        self._scorer = None

    @property
    def ready(self) -> bool:
        r = self._ready
        return r is not None and r.done() and not r.cancelled() and r.exception() is None

    def _load(self):
        if self.threads:
            import torch
            torch.set_num_threads(self.threads)  # in the worker, which runs every forward
        if self.rm is None:
            self.rm = self._source()
        self._scorer = _Scorer(self.rm, self.max_batch_size, self.reduction, self.truncate)
        if self.name is None:
            cfg = getattr(self.rm.model, "config", None)
            self.name = os.path.basename(str(getattr(cfg, "_name_or_path", "") or "")) or \
                type(self.rm.model).__name__

    async def start(self):
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="erm-serve")
        self._queue = asyncio.Queue()
        self._ready = loop.run_in_executor(self._executor, self._load)
        self._task = asyncio.create_task(self._batcher())

    async def stop(self):
        if self._queue is not None:
            await self._queue.put(None)
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, job: Job) -> dict:
        job.future = asyncio.get_running_loop().create_future()
        await self._queue.put(job)
        return await job.future

    async def _batcher(self):
        loop = asyncio.get_running_loop()
        try:
            await self._ready
        except BaseException as exc:  # the model did not load: fail requests, report it
            self.load_error = exc
            log.debug("could not load the model: %s", exc)
            if self.on_load_error is not None:
                self.on_load_error(exc)
        held = None
        while True:
            job = held if held is not None else await self._queue.get()
            held = None
            if job is None:
                return
            jobs, n, stop = [job], job.size, False
            deadline = loop.time() + self.max_wait
            while n < self.max_batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    wait = deadline - loop.time()
                    if wait <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), wait)
                    except asyncio.TimeoutError:
                        break
                if nxt is None:
                    stop = True
                    break
                if n + nxt.size > self.max_batch_size:
                    held = nxt  # the next batch starts with it
                    break
                jobs.append(nxt)
                n += nxt.size
            if self.load_error is not None:
                results = [RequestError(f"the model could not be loaded: {self.load_error}", 503)
                           for _ in jobs]
            else:
                results = await loop.run_in_executor(self._executor, self._scorer.run, jobs)
                self.batches += 1
            for j, res in zip(jobs, results):
                if j.future.done():
                    continue
                if isinstance(res, BaseException):
                    j.future.set_exception(res)
                else:
                    j.future.set_result(res)
            if stop:
                return
