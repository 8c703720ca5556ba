"""erm inside verl: the endogenous reward as a verl reward manager (dense per-token rewards), as a
custom reward function, and erm's fused log-probs/entropies in verl's actor.

Tested with verl 0.9.1. Importing this module needs no verl; the verl classes are built when
first asked for (`EndogenousRewardManager`, `DenseAgentLoopManager`).

The reward manager `erm` (registered through the `verl.plugins` entry point erm installs, so
verl knows the name as soon as it is imported) scores each response with the endogenous reward
and puts the per-token rewards r_t on the response tokens:

    reward.reward_manager.name=erm
    +reward.reward_kwargs.model=/path/to/causal-lm      # or url=http://host:8000 (erm serve)
    reward.num_workers=1                                # one model copy per reward worker
    trainer.use_v1=False

with `actor_rollout_ref.rollout.agent.agent_loop_manager_class` set to
`erm.integrations.verl.DenseAgentLoopManager`; or, without the entry point,
`reward.reward_manager.source=importlib`, `reward.reward_manager.name=EndogenousRewardManager`
and `reward.reward_manager.module.path=pkg://erm.integrations.verl`.

Options (`reward.reward_kwargs`, all optional): `model` (a local model directory or `.gguf`;
unset: the embedded SmolLM2-135M-Instruct) or `url` (an `erm serve` base URL, which then does the
scoring), `system_prompt`, `alpha`, `gamma`, `reduction` ("sum" | "mean": the per-token rewards
divided by the response length, so that they sum to the mean), `dense` (True; False puts the
whole response reward on the last token), `batch_size`, `max_length`, `max_wait_ms` (how long a
request waits for others to batch with), `device`, `dtype`, `timeout` (seconds, for `url`),
`api_key` (for a server started with `--api-key`; unset: $ERM_API_KEY, else none). An
unknown option, a model that cannot be loaded and an unreachable URL are errors when the manager
is built, before the first batch.

Dense rewards need the agent-loop manager above: verl 0.9.1's own agent loop takes one number per
response and puts it on the last token (`dense=False` works with it as is). The rewards are then
`rm_scores`, `token_level_scores` and (without a KL penalty in the reward) `token_level_rewards`;
`gae`, `reinforce_plus_plus` and `remax` use them per token, while `grpo`, `rloo`,
`reinforce_plus_plus_baseline` and the other outcome estimators sum them per response.

Where the reward model shares the policy's tokenizer the rewards align token for token with
verl's response ids (nothing is re-tokenized; a response that ends with an end token is a finished
turn, value 0 after it, and one cut at the length limit closes with the soft value of the next
state). Where it does not, the response text is scored and its reward goes on the last token
(said once in the log).

Custom reward function for verl's default path (one number per response):

    reward.custom_reward_function.path=pkg://erm.integrations.verl
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.model=/path/to/causal-lm

Fused log-probs and entropies in verl's actor (`actor_rollout_ref.model.use_fused_kernels=True`):

    from erm.integrations.verl import use_erm_kernels
    use_erm_kernels()        # in the worker processes, before the model is built
"""
import asyncio
import json
import logging
import os
import threading
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import lm
from ..model import reduce_rewards
from .verl_kernels import ErmFusedLinearForPPO, erm_linear_cross_entropy, use_erm_kernels

# (EndogenousRewardManager, DenseAgentLoopManager and DenseAgentLoopWorker are here too, built
# from verl's classes when first asked for: see `__getattr__`)
__all__ = ["compute_score", "use_erm_kernels", "erm_linear_cross_entropy",
           "ErmFusedLinearForPPO", "reward_options", "scorer_for", "LocalScorer", "RemoteScorer",
           "Batcher", "chat_of", "token_positions", "dense_scores", "DENSE_KEY", "OPTIONS"]

log = logging.getLogger("erm.integrations.verl")

#: The extra field that carries a response's per-token rewards from the reward worker to the
#: dense agent loop.
DENSE_KEY = "erm_token_rewards"

#: The options of the reward manager (`reward.reward_kwargs`) and of `compute_score`, with their
#: defaults. `dense` is the manager's only.
OPTIONS: Dict[str, Any] = {
    "model": None, "url": None, "system_prompt": None, "alpha": 1.0, "gamma": 1.0,
    "reduction": "sum", "dense": True, "batch_size": 8, "max_length": 2048, "max_wait_ms": 5.0,
    "device": None, "dtype": None, "timeout": 60.0, "api_key": None,
}
_STR = ("model", "url", "system_prompt", "device", "dtype", "api_key")
_NUM = ("alpha", "gamma", "max_wait_ms", "timeout")
_POSITIVE = ("alpha", "timeout")
_INT = ("batch_size", "max_length")


def reward_options(kwargs, *, what: str = "reward.reward_kwargs", dense: bool = True) -> dict:
    """The options of `kwargs` (a dict or an OmegaConf mapping; None: none) over the defaults
    of `OPTIONS`.

    Args:
        kwargs: the options given.
        what: how errors name where they come from.
        dense: whether `dense` is an option (the manager's) or not (`compute_score`).
    Returns:
        a new dict with every key of `OPTIONS` (without "dense" when `dense` is False).
    Raises:
        ValueError: an unknown option, a bad value, both `model` and `url`.
        TypeError: a value of the wrong type.
    """
    given = dict(kwargs or {})
    allowed = dict(OPTIONS) if dense else {k: v for k, v in OPTIONS.items() if k != "dense"}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown option(s) {unknown}; the options are {sorted(allowed)}")
    opts = {**allowed, **given}
    for k in _STR:
        if opts[k] is not None and not isinstance(opts[k], str):
            raise TypeError(f"{what}.{k} must be a string or null, got {opts[k]!r}")
    for k in _NUM:
        low = "a positive" if k in _POSITIVE else "a non-negative"
        if isinstance(opts[k], bool) or not isinstance(opts[k], (int, float)) or opts[k] < 0 \
                or (k in _POSITIVE and opts[k] == 0):
            raise ValueError(f"{what}.{k} must be {low} number, got {opts[k]!r}")
        opts[k] = float(opts[k])
    for k in _INT:
        if isinstance(opts[k], bool) or not isinstance(opts[k], int) or opts[k] < 1:
            raise ValueError(f"{what}.{k} must be a positive integer, got {opts[k]!r}")
    if opts["reduction"] not in ("sum", "mean"):
        raise ValueError(f"{what}.reduction must be 'sum' or 'mean', got {opts['reduction']!r}")
    if dense and not isinstance(opts["dense"], bool):
        raise TypeError(f"{what}.dense must be true or false, got {opts['dense']!r}")
    if opts["model"] is not None and opts["url"] is not None:
        raise ValueError(f"{what}: give model or url, not both")
    return opts


# ---------------------------------------------------------------------------------- batching
class Batcher:
    """Gathers concurrent `await submit(item)` calls of one event loop into batches for `run`.

    The first item waits at most `max_wait_s` for others (a full batch of `batch_size` goes at
    once); `run(items) -> results` (one result per item, in order; an Exception instance fails
    its own item) runs in one worker thread, off the event loop, one batch at a time.
    """

    def __init__(self, run: Callable[[list], list], batch_size: int, max_wait_s: float):
        self.run, self.batch_size, self.max_wait_s = run, int(batch_size), float(max_wait_s)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="erm-verl")
        self._queues: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._tasks: set = set()
        self.batches = 0

    async def submit(self, item):
        """The result of `item`, computed in a batch with the items submitted around it."""
        loop = asyncio.get_running_loop()
        q = self._queues.setdefault(loop, {"items": [], "timer": None})
        fut = loop.create_future()
        q["items"].append((item, fut))
        if len(q["items"]) >= self.batch_size:
            self._flush(loop)
        elif q["timer"] is None:
            q["timer"] = loop.call_later(self.max_wait_s, self._flush, loop)
        return await fut

    def _flush(self, loop) -> None:
        q = self._queues[loop]
        if q["timer"] is not None:
            q["timer"].cancel()
            q["timer"] = None
        batch, q["items"] = q["items"], []
        if batch:
            task = loop.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch) -> None:
        loop = asyncio.get_running_loop()
        self.batches += 1
        try:
            results = await loop.run_in_executor(self._executor, self.run, [i for i, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} items")
        except Exception as exc:  # the whole batch failed: every item gets the error
            results = [exc] * len(batch)
        for (_, fut), res in zip(batch, results):
            if fut.done():
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)


# ---------------------------------------------------------------------------------- scorers
class LocalScorer:
    """The endogenous reward of an in-process `erm.EndoRM`, batched across concurrent requests.

    `await token_rewards(enc)`: (n_resp,) float32 CPU rewards of an `erm.lm.Encoded` pair;
    `await response_reward(prompt, text, terminated)`: (Σ r_t, number of tokens) of a text pair.
    """

    def __init__(self, rm, *, max_wait_s: float = 0.005):
        self.rm = rm
        self.tokenizer = rm.tokenizer
        self._tokens = Batcher(lambda encs: self.rm.encoded_stats(encs)[0], rm.batch_size,
                               max_wait_s)
        self._texts = Batcher(self._score_texts, rm.batch_size, max_wait_s)

    def _score_texts(self, items) -> list:
        sums, n = self.rm.response_rewards([p for p, _, _ in items], [r for _, r, _ in items],
                                           terminated=[t for _, _, t in items], progress=False)
        return list(zip(sums.tolist(), n.tolist()))

    async def token_rewards(self, enc: lm.Encoded) -> torch.Tensor:
        """(enc.n_resp,) float32 rewards of the response tokens of `enc`."""
        return await self._tokens.submit(enc)

    async def response_reward(self, prompt, text: str, terminated: bool) -> Tuple[float, int]:
        """(Σ_t r_t, number of response tokens) of one (prompt, response text) pair."""
        return await self._texts.submit((prompt, text, terminated))


class RemoteScorer:
    """The endogenous reward from an `erm serve` server (its `/score` endpoint, with
    `Authorization: Bearer <api_key>` when one is given), batched across concurrent requests;
    building one asks /health and scores one small pair, so a bad URL or key fails here. `await response_reward(prompt, text, terminated)` gives
    (Σ r_t, number of tokens, per-token rewards as the server tokenizes the text)."""

    tokenizer = None

    def __init__(self, url: str, *, batch_size: int = 8, max_wait_s: float = 0.005,
                 timeout: float = 60.0, api_key: Optional[str] = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.health = self._request("GET", "/health", None)
        # one small pair now: a wrong API key or a server that cannot score fails here
        self._score_texts([("Say yes.", "Yes.", True)])
        self._texts = Batcher(self._score_texts, batch_size, max_wait_s)

    def _request(self, method: str, path: str, body: Optional[dict]) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise RuntimeError(f"erm serve at {self.url}{path} answered {exc.code}: {detail}") \
                from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(f"cannot reach erm serve at {self.url}{path}: "
                                  f"{getattr(exc, 'reason', exc)}") from None

    def _score_texts(self, items) -> list:
        body = {"prompts": [p for p, _, _ in items], "responses": [r for _, r, _ in items],
                "terminated": [bool(t) for _, _, t in items], "token_rewards": True}
        out = self._request("POST", "/score", body)
        return [(float(s), len(tr), [float(x) for x in tr])
                for s, tr in zip(out["rewards"], out["token_rewards"])]

    async def response_reward(self, prompt, text: str, terminated: bool):
        """(Σ_t r_t, number of tokens, [r_t]) of one pair, as the server scores it."""
        return await self._texts.submit((prompt, text, terminated))


_SCORERS: Dict[tuple, Any] = {}
_SCORERS_LOCK = threading.Lock()


def scorer_for(opts: dict, *, what: str = "reward.reward_kwargs"):
    """The `LocalScorer` or `RemoteScorer` of `reward_options`' result, one per process for equal
    options (reward managers and `compute_score` calls share it): the model is loaded, or the
    server's /health asked, here.

    Raises:
        ValueError: the model cannot be loaded (naming the option).
        ConnectionError: the `url` cannot be reached.
        RuntimeError: the server refuses to score (a wrong `api_key`: its 401 answer).
    """
    key = tuple(sorted((k, v) for k, v in opts.items() if k not in ("dense", "reduction")))
    with _SCORERS_LOCK:
        if key in _SCORERS:
            return _SCORERS[key]
        wait = opts["max_wait_ms"] / 1000.0
        if opts["url"] is not None:
            key = opts["api_key"] if opts["api_key"] is not None else \
                os.environ.get("ERM_API_KEY") or None
            scorer = RemoteScorer(opts["url"], batch_size=opts["batch_size"], max_wait_s=wait,
                                  timeout=opts["timeout"], api_key=key)
        else:
            from ..model import EndoRM

            try:
                rm = EndoRM.from_pretrained(
                    opts["model"], system_prompt=opts["system_prompt"], alpha=opts["alpha"],
                    gamma=opts["gamma"], device=opts["device"], dtype=opts["dtype"],
                    batch_size=opts["batch_size"], max_length=opts["max_length"])
            except (OSError, ValueError, ImportError, RuntimeError) as exc:
                raise ValueError(f"{what}.model={opts['model']!r}: the reward model cannot be "
                                 f"loaded: {exc}") from exc
            scorer = LocalScorer(rm, max_wait_s=wait)
        _SCORERS[key] = scorer
        return scorer


# ---------------------------------------------------------------------------------- compute_score
_PROMPT_KEYS = ("prompt", "raw_prompt", "question")
_VERL_KWARGS = ("reward_router_address", "reward_model_tokenizer")


def _prompt_of(extra_info) -> Any:
    info = extra_info if isinstance(extra_info, dict) else {}
    for k in _PROMPT_KEYS:
        p = info.get(k)
        if p is not None:
            return chat_of(p)
    raise ValueError("compute_score needs the prompt: put it in the dataset's extra_info as "
                     f"one of {list(_PROMPT_KEYS)} (a string or a list of chat messages)")


def chat_of(prompt) -> Any:
    """A prompt as erm takes it: a string, or a list of {"role", "content"} dicts (verl keeps
    chats as numpy object arrays of dicts)."""
    if isinstance(prompt, str):
        return prompt
    if hasattr(prompt, "tolist") and not isinstance(prompt, dict):
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise TypeError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")


async def compute_score(data_source=None, solution_str: str = "", ground_truth=None,
                        extra_info: Optional[dict] = None, **kwargs) -> float:
    """verl's custom reward function: the endogenous reward of one response (async; concurrent
    calls are scored together, up to `batch_size` pairs per forward).

    Args:
        data_source, ground_truth: accepted and not used (the reward needs no reference).
        solution_str: the decoded response (verl drops its special tokens, so it is scored as a
            finished turn, the end-of-turn token counted).
        extra_info: the dataset's extra_info; its "prompt" (or "raw_prompt" / "question") is the
            prompt, a string (one user turn) or a chat.
        **kwargs: the options of `reward_options` but `dense` (verl passes
            `custom_reward_function.reward_kwargs` here), and verl's own keyword arguments.
    Returns:
        the reward as a float: Σ_t r_t ("sum") or Σ_t r_t / n ("mean"); 0.0 for an empty
        response.
    Raises:
        ValueError / TypeError: an unknown option, no prompt in extra_info.
    """
    opts = reward_options({k: v for k, v in kwargs.items() if k not in _VERL_KWARGS},
                          what="custom_reward_function.reward_kwargs", dense=False)
    scorer = scorer_for(opts, what="custom_reward_function.reward_kwargs")
    prompt = _prompt_of(extra_info)
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be a string, got {type(solution_str).__name__}")
    if not solution_str.strip():
        return 0.0
    total, n = (await scorer.response_reward(prompt, solution_str, True))[:2]
    return float(reduce_rewards(torch.tensor([total]), torch.tensor([n]), opts["reduction"])[0])


# ---------------------------------------------------------------------------------- verl classes
_LAZY = {"EndogenousRewardManager": ".verl_manager",
         "DenseAgentLoopManager": ".verl_agent_loop",
         "DenseAgentLoopWorker": ".verl_agent_loop"}


def __getattr__(name: str):
    """The classes built on verl's (imported on first use, so this module needs no verl)."""
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name], __name__.rpartition(".")[0])
        except ModuleNotFoundError as exc:
            raise ImportError(f"erm.integrations.verl.{name} needs verl ({exc}); "
                              "pip install verl") from exc
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def token_positions(values: Sequence[Sequence[float]], lengths: Sequence[int],
                    width: int) -> torch.Tensor:
    """A (B, width) float32 tensor with row i holding values[i] on its first len(values[i])
    positions (a list of one number, or one of another length than lengths[i], goes on position
    lengths[i] − 1, the last response token); zeros elsewhere."""
    out = torch.zeros(len(values), width, dtype=torch.float32)
    for i, (v, n) in enumerate(zip(values, lengths)):
        v = [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        n = int(n)
        if n <= 0:
            continue
        if len(v) == n:
            out[i, :n] = torch.tensor(v, dtype=torch.float32)
        else:
            out[i, n - 1] = float(sum(v))
    return out


def dense_scores(values: List[Any]) -> Tuple[List[float], List[Optional[List[float]]]]:
    """(one float per response, its per-token list or None) of the `reward_score`s a reward
    worker returns (a float, or a list of per-token rewards)."""
    totals, per_token = [], []
    for v in values:
        if isinstance(v, (list, tuple)):
            totals.append(float(sum(float(x) for x in v)))
            per_token.append([float(x) for x in v])
        else:
            totals.append(float(v))
            per_token.append(None)
    return totals, per_token
