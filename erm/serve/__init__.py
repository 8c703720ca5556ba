"""`erm serve`: the endogenous reward over HTTP, for RL stacks that call a remote reward model.

    erm serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--max-batch-size 32]
              [--max-wait-ms 5] [--system-prompt ...] [--alpha 1.0] [--gamma 1.0]
              [--device-map auto] [--reduction sum|mean] [--api-key KEY] [--docs]
              [--max-body-mb 16] [--max-pairs 4096] [--max-queue 4096]
              [--read-timeout 30] [--shutdown-timeout 30]

Endpoints (JSON in, JSON out):

* ``GET /health`` — 200 ``{"status": "ok", "model": ...}`` once the model is loaded, 503
  ``{"status": "loading"}`` before (``"error"`` when the model failed to load or the worker
  stopped).
* ``POST /score`` — ``{"prompts": [str | messages], "responses": [str], "reduction"?: "sum" |
  "mean", "token_rewards"?: bool, "terminated"?: bool | [bool]}`` → ``{"rewards": [float],
  "prompt_truncated": [bool], "token_rewards"?: [[float]]}``, equal to `erm.EndoRM.score`
  in-process (a prompt is a user turn, or a chat, rendered with the model's chat template;
  `token_rewards` are the per-token rewards, the end-of-turn token included, summing to the "sum"
  reward; `prompt_truncated` is always there, true for each pair whose prompt was cut).
* ``POST /get_reward`` — OpenRLHF's remote reward-model protocol (``--remote_rm_url
  http://host:port/get_reward``): ``{"query": [str], "prompts": [str], "labels"?: [...]}`` →
  ``{"rewards": [float], "scores": [float], "extra_logs": {"response_tokens": [int],
  "terminated": [int], "prompt_truncated": [int]}}`` (OpenRLHF logs each extra_logs entry; every
  key is always there, since it merges them across samples). Each query is the decoded prompt +
  response text (special tokens kept) and each prompt the text the policy was given (its chat
  template already applied), so the response is the query after its prompt. Both are tokenized
  as they are (no template added); a response that ends with an end-of-turn/EOS token is scored
  as a finished turn (that token counted, value 0 after it), one cut at the generation limit as
  truncated (the soft value of the next state closes the sum). `labels` are accepted and not
  used. An empty response scores 0; `prompt_truncated` is 1 where the prompt was cut.

Concurrent requests are batched (dynamic batching): the first request waits at most
``--max-wait-ms`` for others, up to ``--max-batch-size`` pairs, and all of them are encoded and
scored together by one worker thread off the event loop — sorted by length, one forward per
``--max-batch-size`` pairs — then each request gets its own answers in its own order. A malformed
body gets 400 (not JSON) or 422 (a message naming the field and the item) and the server keeps
serving; a pair that cannot be scored (a response longer than ``--max-length``) fails only its
own request. A prompt longer than ``--max-length`` allows is cut from the left: the answer flags
it (``prompt_truncated``) and the ``erm.serve`` logger warns once per request with the count
(``--no-truncate``: a 422 instead). SIGTERM (or Ctrl-C) stops accepting connections, answers
every request already received within ``--shutdown-timeout`` seconds, and exits 0.

Whatever a request holds, it fails alone: a lone surrogate, a chat template that raises, a
tokenizer's own error give that request a 4xx naming the item, and the worker goes on (should the
batching task ever end, /health and every request answer 503). Limits, each a 4xx before any
model work: a body over ``--max-body-mb`` (413), more than ``--max-pairs`` pairs (413), a
response with more characters than max_length tokens can hold (422, before tokenizing), JSON
nested past the parser's limit (400), more than ``--max-queue`` pairs waiting (429 with
Retry-After), a body not all sent within ``--read-timeout`` seconds (408, connection closed). A
request whose client went away is not scored. ``--api-key`` (or ``ERM_API_KEY``): /score and
/get_reward answer 401 without ``Authorization: Bearer KEY``; /docs and /openapi.json only with
``--docs``.

Programmatic use: `make_app(rm)` (a FastAPI app), `serve(rm, host, port)`, and
`running(rm)` — a context manager serving on a free loopback port in a thread, yielding its URL.
The package: `protocol` (request parsing), `batcher` (`RewardServer`, the batching worker),
`app` (the HTTP side); the command line is erm/cli/serve.py (also `python -m erm.serve`).
Needs the `serve` extra: ``pip install erm[serve]`` (fastapi, uvicorn).
"""
from .app import make_app, running, serve
from .batcher import RewardServer
from .protocol import Job, RequestError, parse_get_reward, parse_score

__all__ = ["RewardServer", "RequestError", "Job", "make_app", "serve", "running", "parse_score",
           "parse_get_reward"]
