"""The reward server's requests: a `/score` or OpenRLHF `/get_reward` JSON body parsed into a
`Job` (what to score and where its answer goes), or a `RequestError` naming the field and item
that is wrong (answered with its HTTP status, 422 by default)."""
from dataclasses import dataclass, field
from typing import Any, List

from .. import lm


class RequestError(ValueError):
    """A request that cannot be scored: answered with `status` and the message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


_SCORE_KEYS = {"prompts", "responses", "reduction", "token_rewards", "terminated"}


def _list_of(body: dict, key: str, what: str) -> list:
    if key not in body:
        raise RequestError(f"missing field '{key}'")
    value = body[key]
    if not isinstance(value, list):
        raise RequestError(f"'{key}' must be a list of {what}, got {type(value).__name__}")
    if not value:
        raise RequestError(f"'{key}' is empty")
    return value


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {value!r}")
    return value


@dataclass
class Job:
    """One request: what to score and where its answer goes."""

    kind: str                      # "score" | "openrlhf"
    prompts: list
    responses: List[str]
    terminated: List[bool] = field(default_factory=list)
    reduction: str = "sum"
    token_rewards: bool = False
    future: Any = None

    @property
    def size(self) -> int:
        return len(self.responses)


def parse_score(body) -> Job:
    """A `/score` body as a job; RequestError naming the field and item when malformed."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _SCORE_KEYS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; expected {sorted(_SCORE_KEYS)}")
    prompts = _list_of(body, "prompts", "strings or message lists")
    responses = _list_of(body, "responses", "strings")
    if len(prompts) != len(responses):
        raise RequestError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for i, p in enumerate(prompts):
        try:
            lm.messages(p)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"prompts[{i}]: {exc}") from None
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise RequestError(f"responses[{i}] must be a string, got {type(r).__name__}")
        if not r.strip():
            raise RequestError(f"responses[{i}] is empty: there is nothing to score")
    reduction = body.get("reduction", "sum")
    if reduction not in ("sum", "mean"):
        raise RequestError(f"'reduction' must be \"sum\" or \"mean\", got {reduction!r}")
    term = body.get("terminated", True)
    if isinstance(term, list):
        if len(term) != len(responses):
            raise RequestError(f"'terminated' has {len(term)} entries for {len(responses)} pairs")
        term = [_bool(t, f"terminated[{i}]") for i, t in enumerate(term)]
    else:
        term = [_bool(term, "terminated")] * len(responses)
    return Job("score", list(prompts), list(responses), term, reduction,
                _bool(body.get("token_rewards", False), "token_rewards"))


def parse_get_reward(body) -> Job:
    """An OpenRLHF `/get_reward` body as a job (responses = each query after its prompt)."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    queries = _list_of(body, "query", "strings")
    if "prompts" not in body:
        raise RequestError("missing field 'prompts': the endogenous reward scores the response "
                           "after its prompt, so each query needs its prompt text")
    prompts = _list_of(body, "prompts", "strings")
    if len(prompts) != len(queries):
        raise RequestError(f"got {len(queries)} queries but {len(prompts)} prompts")
    responses = []
    for i, (q, p) in enumerate(zip(queries, prompts)):
        if not isinstance(q, str):
            raise RequestError(f"query[{i}] must be a string, got {type(q).__name__}")
        if not isinstance(p, str):
            raise RequestError(f"prompts[{i}] must be a string, got {type(p).__name__}")
        if not q.startswith(p):
            raise RequestError(f"query[{i}] does not start with prompts[{i}]")
        responses.append(q[len(p):])
    return Job("openrlhf", list(prompts), responses)
