"""The reward server's batching: `RewardServer` admits requests (`Job`s) within its limits,
queues them, gathers those that arrive within `max_wait_ms` (up to `max_batch_size` pairs) and
scores them together in one worker thread off the event loop — encoded, sorted by length, one
forward per `max_batch_size` pairs — then answers each request in its own order.

Whatever a request holds, it fails alone: an item that cannot be encoded (a tokenizer or chat
template that raises, a response too long) fails its own request with a 422 naming the item, and
the worker goes on. Should the batching task ever end, every waiting request gets a 503, and so
does every later one (`alive` is False, /health answers 503)."""
import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, List, Optional, Sequence

from .. import lm
from .._checks import check_int, check_reduction
from ..model import reduce_rewards
from ..scoring import in_batches, response_sums
from .protocol import Job, RequestError

log = logging.getLogger("erm.serve")

#: Default limits: pairs per request, pairs waiting in the queue.
MAX_PAIRS = 4096
MAX_QUEUE = 4096


def _clip(exc: BaseException, n: int = 500) -> str:
    text = str(exc)
    return text if len(text) <= n else text[:n] + " ..."


class ClientGone(Exception):
    """The client of a request disconnected before its answer (nothing more of it is scored)."""


def _longest_token(tokenizer) -> Optional[int]:
    """Characters of the longest string in the tokenizer's vocabulary (None: none to read)."""
    try:
        return max((len(t) for t in tokenizer.get_vocab()), default=0) or None
    except Exception:  # a tokenizer without a readable vocabulary: no length check
        return None


class _Scorer:
    """Encodes and scores batches of jobs; runs in the one worker thread (`check` also runs on
    the event loop: it only reads)."""

    def __init__(self, rm, max_batch_size: int, reduction: str, truncate: bool):
        self.rm = rm
        self.max_batch_size = max_batch_size
        self.reduction = reduction
        self.truncate = truncate
        tok = rm.tokenizer
        longest = _longest_token(tok)
        # a response of more characters than max_length tokens can hold is refused untokenized
        # (exact for a tokenizer that keeps every character: each token covers at most
        # `longest` of them)
        self.max_chars = rm.max_length * longest if longest and rm.max_length else None
        pad = lm.pad_id(tok, rm.end_ids)
        self.pad_text = "" if pad in set(rm.end_ids) else tok.decode([pad])

    # -- checks and encoding
    def _raw_length(self, r: str) -> int:
        """Characters of a raw response without the padding tokens it may end with."""
        end, pad = len(r), self.pad_text
        while pad and end >= len(pad) and r.startswith(pad, end - len(pad)):
            end -= len(pad)
        return end

    def check(self, job: Job) -> None:
        """RequestError for a response far too long to fit in max_length, before any
        tokenizer or chat template sees it."""
        if self.max_chars is None:
            return
        for i, r in enumerate(job.responses):
            n = len(r.strip()) if job.kind == "score" else self._raw_length(r)
            if n > self.max_chars:
                what = "pair" if job.kind == "score" else "query"
                raise RequestError(f"{what} {i}: the response is {n} characters, more than "
                                   f"max_length={self.rm.max_length} tokens can hold (at most "
                                   f"{self.max_chars // self.rm.max_length} characters per "
                                   "token in this vocabulary)")

    @staticmethod
    def _item(what: str, i: int, encode: Callable[[], Optional[lm.Encoded]]):
        """encode(), its failure a RequestError naming the item."""
        try:
            return encode()
        except RequestError:
            raise
        except (TypeError, ValueError) as exc:
            raise RequestError(f"{what} {i}: {_clip(exc)}") from None
        except Exception as exc:  # a chat template that raises, a tokenizer's own error
            source = ("the chat template refused it" if type(exc).__module__.startswith("jinja2")
                      else "it could not be encoded")
            raise RequestError(f"{what} {i}: {source}: {type(exc).__name__}: {_clip(exc)}"
                               ) from None

    def _check_cut(self, enc: lm.Encoded, i: int) -> lm.Encoded:
        if enc.n_cut and not self.truncate:
            raise RequestError(f"pair {i}: the prompt is {enc.n_cut} token(s) too long for "
                               f"max_length={self.rm.max_length}")
        return enc

    def _encode_score(self, job: Job) -> List[lm.Encoded]:
        """Each pair as the assistant turn after its prompt (`EndoRM.encode`)."""
        encs = []
        for i, (p, r, t) in enumerate(zip(job.prompts, job.responses, job.terminated)):
            enc = self._item("pair", i, lambda: self.rm.encode(p, r, terminated=t))
            encs.append(self._check_cut(enc, i))
        return encs

    def _encode_one_raw(self, p: str, r: str) -> Optional[lm.Encoded]:
        rm, tok = self.rm, self.rm.tokenizer
        ends = set(rm.end_ids)
        pad = lm.pad_id(tok, rm.end_ids)
        resp = lm.tokenize(tok, r)[0] if r else []
        while resp and resp[-1] == pad and pad not in ends:
            resp.pop()
        if not resp:
            return None  # an empty response: reward 0
        ctx = lm.tokenize(tok, p)[0] if p else []
        return lm.join_context(tok, ctx, resp, end_ids=rm.end_ids, max_length=rm.max_length,
                               terminated=resp[-1] in ends)

    def _encode_raw(self, job: Job) -> List[Optional[lm.Encoded]]:
        """Prompt and response text tokenized as they are (OpenRLHF sends rendered text)."""
        encs = []
        for i, (p, r) in enumerate(zip(job.prompts, job.responses)):
            enc = self._item("query", i, lambda: self._encode_one_raw(p, r))
            encs.append(self._check_cut(enc, i) if enc is not None else None)
        return encs

    # -- scoring
    def _rewards(self, encs: List[lm.Encoded]) -> list:
        """Per-token reward tensors of each encoded pair, in order: sorted by length, one
        forward per max_batch_size pairs."""
        return in_batches([len(e.ids) for e in encs], self.max_batch_size,
                          lambda idx: self.rm.encoded_stats([encs[i] for i in idx])[0],
                          progress=False)

    def run(self, jobs: Sequence[Job]) -> list:
        """One result (a dict), exception or None (a cancelled job) per job."""
        results: list = [None] * len(jobs)
        encoded: list = [[] for _ in jobs]
        for k, job in enumerate(jobs):
            if job.cancelled:
                continue
            try:
                self.check(job)
                encoded[k] = (self._encode_score(job) if job.kind == "score"
                              else self._encode_raw(job))
            except RequestError as exc:
                results[k] = exc
        live = [k for k, job in enumerate(jobs) if results[k] is None and not job.cancelled]
        flat = [e for k in live for e in encoded[k] if e is not None]
        try:
            rewards = iter(self._rewards(flat) if flat else ())
        except Exception as exc:  # the model failed: every request of the batch gets it
            log.exception("scoring failed")
            err = RequestError(f"scoring failed: {type(exc).__name__}: {exc}", 500)
            return [err if k in live else r for k, r in enumerate(results)]
        for k in live:
            encs = encoded[k]
            results[k] = self._answer(jobs[k], encs,
                                      [next(rewards) if e is not None else None for e in encs])
        return results

    def _answer(self, job: Job, encs: List[Optional[lm.Encoded]], per: list) -> dict:
        """The JSON answer of one job from its per-token reward tensors (None: an empty
        response); logs a warning when prompts of the job were cut to fit max_length."""
        # as EndoRM.score: the sum in float64, stored as float32; the mean from that float32
        sums, lengths = response_sums(per)
        reduction = job.reduction if job.kind == "score" else self.reduction
        vals = reduce_rewards(sums, lengths, reduction).tolist()
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
                "extra_logs": {"response_tokens": lengths.tolist(),
                               "terminated": [int(e.terminated) if e is not None else 1
                                              for e in encs],
                               "prompt_truncated": [int(c > 0) for c in cut]}}


class RewardServer:
    """The state behind the app: the model (or how to load it), the limits, the batching queue
    and the worker.

    Args:
        rm: an `erm.EndoRM`, or a zero-argument callable returning one (run in the worker thread
            at start-up; /health answers 503 until it returns).
        max_batch_size: most pairs scored together (and per forward pass).
        max_wait_ms: how long the first request of a batch waits for others (finite, >= 0).
        reduction: reduction of `/get_reward` ("sum" or "mean").
        truncate: cut prompts longer than the model's max_length from the left (False: 422).
        threads: torch intra-op threads of the worker (None: torch's default). On a CPU shared
            with other jobs, 1 avoids OpenMP threads waiting on each other (measured on a busy
            2-core machine: 0.15 s per SmolLM2-135M pair with 1 thread, 4 s with 2).
        max_pairs: most pairs in one request (more: 413).
        max_queue: most pairs waiting to be scored; a request that would go over gets 429 with
            a Retry-After estimate (a request is always taken when nothing waits).
    """

    def __init__(self, rm, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 reduction: str = "sum", truncate: bool = True, name: Optional[str] = None,
                 threads: Optional[int] = None, max_pairs: int = MAX_PAIRS,
                 max_queue: int = MAX_QUEUE):
        check_int(max_batch_size, "max_batch_size", 1)
        check_int(max_pairs, "max_pairs", 1)
        check_int(max_queue, "max_queue", 1)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or \
                not (math.isfinite(max_wait_ms) and max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        check_reduction(reduction)
        self._source = rm
        self.rm = None if callable(rm) and not hasattr(rm, "score") else rm
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.reduction = reduction
        self.truncate = truncate
        self.name = name
        self.threads = threads
        self.max_pairs = max_pairs
        self.max_queue = max_queue
        self.load_error: Optional[BaseException] = None
        self.worker_error: Optional[BaseException] = None   # why the batching task ended
        self.on_load_error: Optional[Callable[[BaseException], None]] = None
        self.batches = 0          # batches scored (for tests and logs)
        self.queued = 0           # pairs waiting in the queue
        self.skipped = 0          # requests dropped because their client went away
        self._seconds_per_pair = 0.0
        self._executor = None
        self._queue = None
        self._task = None
        self._ready = None
        self._scorer = None
        self._stopping = False
        self._pending: set = set()

    @property
    def ready(self) -> bool:
        """The model is loaded and the batching task runs."""
        r = self._ready
        return (r is not None and r.done() and not r.cancelled() and r.exception() is None
                and self.alive)

    @property
    def alive(self) -> bool:
        """The batching task runs (False before `start` and after it ended)."""
        return self._task is not None and not self._task.done()

    @property
    def stopped(self) -> bool:
        """The batching task ran and ended (at shutdown, or should it ever fail)."""
        return self._task is not None and self._task.done()

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
        """Start the worker thread (loading the model there when `rm` is a loader) and the
        batching task, on the running event loop."""
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="erm-serve")
        self._queue = asyncio.Queue()
        self._ready = loop.run_in_executor(self._executor, self._load)
        self._task = asyncio.create_task(self._batcher())
        self._task.add_done_callback(self._batcher_ended)

    async def stop(self):
        """Score what is queued, then end the batching task and the worker."""
        self._stopping = True
        if self._task is not None and not self._task.done():
            await self._queue.put(None)
            await asyncio.wait([self._task])
        self._fail_pending(RequestError("the server is shutting down", 503))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- admission
    def _admit(self, job: Job) -> None:
        if self._task is None or not self.alive:
            why = f": {self.worker_error}" if self.worker_error is not None else ""
            raise RequestError(f"the scoring worker is not running{why}", 503)
        if self.load_error is not None:
            raise RequestError(f"the model could not be loaded: {self.load_error}", 503)
        if job.size > self.max_pairs:
            raise RequestError(f"{job.size} pairs in one request; this server takes at most "
                               f"{self.max_pairs} (max_pairs): split the request", 413)
        if self._scorer is not None:
            self._scorer.check(job)
        if self.queued and self.queued + job.size > self.max_queue:
            wait = max(1, min(600, math.ceil(self.queued * self._seconds_per_pair)))
            raise RequestError(f"the server is busy: {self.queued} pairs are waiting (max_queue="
                               f"{self.max_queue}); retry later", 429, {"Retry-After": str(wait)})

    async def submit(self, job: Job, disconnected: Optional[Awaitable] = None) -> dict:
        """Queue `job` and return its answer; RequestError when it is refused or fails.
        `disconnected`: an awaitable that completes when the client goes away, which then
        drops the job (ClientGone)."""
        if disconnected is not None:
            disconnected = asyncio.ensure_future(disconnected)
        try:
            self._admit(job)
            job.future = asyncio.get_running_loop().create_future()
            self.queued += job.size
            self._pending.add(job)
            self._queue.put_nowait(job)
            if disconnected is None:
                return await job.future
            await asyncio.wait({job.future, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                self.skipped += 1
                raise ClientGone(f"the client went away; {job.size} pair(s) not scored")
            return job.future.result()
        finally:
            if disconnected is not None:
                disconnected.cancel()
            self._drop(job)

    def _drop(self, job: Job) -> None:
        """Forget `job`; if it has no answer yet, nothing more of it is scored."""
        self._pending.discard(job)
        fut = job.future
        if fut is not None and (not fut.done() or fut.cancelled()):
            job.cancelled = True
            fut.cancel()
            if not job.taken:
                job.taken = True
                self.queued -= job.size

    def _take(self, job: Job) -> bool:
        """The batcher takes `job` off the queue: False when it was dropped meanwhile."""
        if job.taken:
            return False
        job.taken = True
        self.queued -= job.size
        return not job.cancelled

    def _fail_pending(self, err: RequestError) -> None:
        for job in list(self._pending):
            if job.future is not None and not job.future.done():
                job.future.set_exception(err)
        self._pending.clear()

    def _batcher_ended(self, task: asyncio.Task) -> None:
        exc = asyncio.CancelledError("cancelled") if task.cancelled() else task.exception()
        if exc is None and self._stopping:
            return
        self.worker_error = exc or RuntimeError("it stopped")
        log.error("the batching task ended: %s: %s; every request now gets 503",
                  type(self.worker_error).__name__, self.worker_error)
        self._fail_pending(RequestError(f"the scoring worker stopped ({self.worker_error!r}); "
                                        "the server must be restarted", 503))

    # -- the batching task
    async def _batcher(self):
        try:
            await self._ready
        except BaseException as exc:  # the model did not load: fail requests, report it
            self.load_error = exc
            log.debug("could not load the model: %s", exc)
            if self.on_load_error is not None:
                self.on_load_error(exc)
        held = None
        while True:
            jobs, held, stop = await self._gather(held)
            if jobs:
                await self._score(jobs)
            if stop:
                return

    async def _gather(self, held: Optional[Job]):
        """(jobs of the next batch, the job that starts the one after, whether to stop)."""
        loop = asyncio.get_running_loop()
        job = held if held is not None else await self._queue.get()
        if job is None:
            return [], None, True
        jobs, n = ([job], job.size) if self._take(job) else ([], 0)
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
                return jobs, None, True
            if nxt.taken:  # dropped while it waited
                continue
            if n + nxt.size > self.max_batch_size and jobs:
                return jobs, nxt, False  # the next batch starts with it
            self._take(nxt)
            jobs.append(nxt)
            n += nxt.size
        return jobs, None, False

    async def _score(self, jobs: List[Job]) -> None:
        loop = asyncio.get_running_loop()
        if self.load_error is not None:
            results = [RequestError(f"the model could not be loaded: {self.load_error}", 503)
                       for _ in jobs]
        else:
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._scorer.run, jobs)
            except Exception as exc:  # the worker itself failed: these requests get it
                log.exception("the scoring worker failed")
                results = [RequestError(f"scoring failed: {type(exc).__name__}: {exc}", 500)
                           for _ in jobs]
            self.batches += 1
            pairs = sum(j.size for j in jobs) or 1
            self._seconds_per_pair = (time.perf_counter() - t0) / pairs
        for j, res in zip(jobs, results):
            if res is None or j.future.done():
                continue
            if isinstance(res, BaseException):
                j.future.set_exception(res)
            else:
                j.future.set_result(res)
