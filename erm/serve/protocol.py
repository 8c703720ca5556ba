"""The reward server's requests: a `/score` or OpenRLHF `/get_reward` JSON body parsed into a
`Job` (what to score and where its answer goes), or a `RequestError` naming the field and item
that is wrong (answered with its HTTP status, 422 by default; 400 for a body that is not JSON or
is nested too deeply). Every string a job carries is valid Unicode (a lone surrogate, which JSON's
"\\ud800" escape can write, is refused here, before any tokenizer sees it)."""
import json
import reprlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .. import lm
from ..scoring import terminated_flags

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 40, 40, 2


def short(value) -> str:
    """A repr of `value` short enough for an error message (strings and nesting cut)."""
    return _SHORT.repr(value)


class RequestError(ValueError):
    """A request that cannot be scored: answered with `status`, the message and `headers`
    (e.g. Retry-After on a 429)."""

    def __init__(self, message: str, status: int = 422,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


_SCORE_KEYS = {"prompts", "responses", "reduction", "token_rewards", "terminated"}


def parse_json(raw: bytes):
    """The JSON value of a request body; RequestError (400) when it is not JSON (or not UTF-8)
    or is nested more deeply than the parser's recursion limit allows."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError("the body is nested too deeply to be a request", 400) from None
    except ValueError:
        raise RequestError("the body is not valid JSON", 400) from None


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
        raise RequestError(f"'{name}' must be true or false, got {short(value)}")
    return value


def _text(value, name: str) -> str:
    """`value` if it is a string of valid Unicode (encodable as UTF-8), else RequestError."""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{name} is not valid Unicode: a lone surrogate "
                           f"({value[exc.start]!a}) at character {exc.start}") from None
    return value


@dataclass(eq=False)  # identity: a job is one request
class Job:
    """One request: what to score and where its answer goes. `cancelled`: its client went away
    (nothing of it is scored from then on); `taken`: the batcher took it off the queue."""

    kind: str                      # "score" | "openrlhf"
    prompts: list
    responses: List[str]
    terminated: List[bool] = field(default_factory=list)
    reduction: str = "sum"
    token_rewards: bool = False
    future: Any = None
    cancelled: bool = False
    taken: bool = False

    @property
    def size(self) -> int:
        return len(self.responses)


def _prompt(p, i: int):
    try:
        msgs = lm.messages(p)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"prompts[{i}]: {exc}") from None
    if isinstance(p, str):
        _text(p, f"prompts[{i}]")
    else:
        for j, m in enumerate(msgs):
            _text(m["role"], f"prompts[{i}][{j}].role")
            _text(m["content"], f"prompts[{i}][{j}].content")
    return p


def _terminated(body: dict, n: int) -> List[bool]:
    term = body.get("terminated", True)
    if isinstance(term, list):  # JSON booleans only: 0 and 1 are refused
        for i, t in enumerate(term):
            _bool(t, f"terminated[{i}]")
    else:
        _bool(term, "terminated")
    try:
        return terminated_flags(term, n)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"'terminated': {exc}") from None


def parse_score(body) -> Job:
    """A `/score` body as a job; RequestError naming the field and item when malformed."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _SCORE_KEYS)
    if unknown:
        raise RequestError(f"unknown field(s) {short(unknown)}; expected {sorted(_SCORE_KEYS)}")
    prompts = _list_of(body, "prompts", "strings or message lists")
    responses = _list_of(body, "responses", "strings")
    if len(prompts) != len(responses):
        raise RequestError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for i, p in enumerate(prompts):
        _prompt(p, i)
    for i, r in enumerate(responses):
        _text(r, f"responses[{i}]")
        if not r.strip():
            raise RequestError(f"responses[{i}] is empty: there is nothing to score")
    reduction = body.get("reduction", "sum")
    if reduction not in ("sum", "mean"):
        raise RequestError(f"'reduction' must be \"sum\" or \"mean\", got {short(reduction)}")
    term = _terminated(body, len(responses))
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
        _text(q, f"query[{i}]")
        _text(p, f"prompts[{i}]")
        if not q.startswith(p):
            raise RequestError(f"query[{i}] does not start with prompts[{i}]")
        responses.append(q[len(p):])
    return Job("openrlhf", list(prompts), responses)
