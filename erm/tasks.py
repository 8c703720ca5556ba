"""Prompt sets for the RL loop and their verifiable reward (exact match of the final number).

    train, held = load_prompts()          # the built-in arithmetic set, 40 prompts held back
    train, held = load_prompts("my.jsonl")
    is_correct("So the answer is 12.", "12")   # True

The built-in set, erm/data/arithmetic.jsonl, is `make_arithmetic()` written by `write_arithmetic`.
Test: tests/test_rl.py.
"""
import random
import re
from pathlib import Path
from typing import List, Optional, Tuple

from . import jsonio
from .data import DataError, json_lines, read_lines

ARITHMETIC = Path(__file__).parent / "data" / "arithmetic.jsonl"


def load_prompts(path: Optional[str] = None) -> Tuple[List[dict], List[dict]]:
    """(train, eval) prompt records {"prompt": str, "answer": str | None}.

    `path`: .jsonl with a "prompt" per line (optional "answer", optional "split": "eval" marks
    held-back prompts) or a text file with one prompt per line, plain or gzip-compressed UTF-8
    (read by `erm.data`); None: erm/data/arithmetic.jsonl.

    Raises:
        FileNotFoundError: no such file.
        DataError (a ValueError): a line that is not JSON or has no 'prompt' (naming the file
            and line), no prompts, or every prompt in the eval split.
    """
    path = Path(path) if path is not None else ARITHMETIC
    if path.suffix == ".jsonl":
        lines = json_lines(path)
    else:
        lines = ((n, {"prompt": line}) for n, line in enumerate(read_lines(path), 1)
                 if line.strip())
    rows = []
    for n, d in lines:
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), (str, list)):
            raise DataError(f"{path}: line {n}: needs a 'prompt' field")
        a = d.get("answer")
        rows.append({"prompt": d["prompt"], "answer": None if a is None else str(a),
                     "split": d.get("split", "train")})
    if not rows:
        raise DataError(f"{path}: no prompts")
    train = [r for r in rows if r["split"] != "eval"]
    held = [r for r in rows if r["split"] == "eval"]
    if not train:
        raise DataError(f"{path}: every prompt is in the eval split")
    return train, held


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> Optional[str]:
    """The last number in `text` ("1,200" → "1200"), or None."""
    found = _NUM.findall(text.replace(",", ""))
    return found[-1] if found else None


def is_correct(text: str, answer: Optional[str]) -> bool:
    """Exact match of the final number of `text` with `answer` (compared as numbers)."""
    if answer is None:
        return False
    got = final_number(text)
    try:
        return got is not None and float(got) == float(answer)
    except ValueError:
        return False


def make_arithmetic(n: int = 200, seed: int = 1234, eval_every: int = 5) -> List[dict]:
    """Short arithmetic word problems (the built-in prompt set), deterministic for a seed.
    Every `eval_every`-th problem is held back ("split": "eval")."""
    rng = random.Random(seed)
    names = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Zoe", "Leo", "Eva"]
    items = ["apple", "book", "pencil", "marble", "cookie", "sticker", "card", "ball"]

    def one():
        who, it, kind = rng.choice(names), rng.choice(items), rng.randrange(7)
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        if kind == 0:
            return f"{who} has {a} {it}s and buys {b} more. How many {it}s does {who} have now?", a + b
        if kind == 1:
            a, b = max(a, b) + 1, min(a, b)
            return f"{who} had {a} {it}s and gave {b} to a friend. How many {it}s are left?", a - b
        if kind == 2:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            return (f"There are {a} boxes with {b} {it}s in each box. "
                    f"How many {it}s are there in total?", a * b)
        if kind == 3:
            a, b = rng.randint(2, 9), rng.randint(2, 6)
            return (f"{who} shares {a * b} {it}s equally among {b} friends. "
                    f"How many {it}s does each friend get?", a)
        if kind == 4:
            return f"What is {a} plus {b}?", a + b
        if kind == 5:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            return f"What is {a} times {b}?", a * b
        c = rng.randint(1, min(a + b - 1, 9))
        return (f"{who} has {a} {it}s, gets {b} more and then loses {c}. "
                f"How many {it}s does {who} have?", a + b - c)

    out, seen = [], set()
    while len(out) < n:
        q, ans = one()
        if q in seen:
            continue
        seen.add(q)
        out.append({"prompt": q + " Answer with a number.", "answer": str(ans),
                    "split": "eval" if len(out) % eval_every == eval_every - 1 else "train"})
    return out


def write_arithmetic(path: Path = ARITHMETIC) -> None:
    """(Re)write the built-in prompt file from `make_arithmetic()`."""
    with open(path, "w", encoding="utf-8") as f:
        for d in make_arithmetic():
            f.write(jsonio.dumps(d, str(path)) + "\n")
