"""Write and check erm/data/best_of_n.jsonl, the built-in best-of-N demonstration file.

    python dev/make_bon_demo.py            # regenerate the file (deterministic), then check it
    python dev/make_bon_demo.py --check    # only check the shipped file

Each record is an arithmetic question with 6 candidate solutions, some right and some wrong
(a dropped carry, a borrow done the wrong way round, an operation mixed up, a slip of one or
ten), short or worked step by step, each ending in "The answer is N.". The check does not trust
the generator: it recomputes every question's answer from its text, reads the final number of
every solution, and requires `correct` and `answers` to agree with them.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "erm" / "data" / "best_of_n.jsonl"
N_CANDIDATES = 6
PER_SUBSET = 8
SEED = 2026

NAMES = ["Mia", "Leo", "Ana", "Sam", "Ivy", "Tom", "Zoe", "Max", "Eva", "Ben"]
THINGS = ["stickers", "marbles", "stamps", "shells", "cards", "pencils", "beads", "coins"]


def _say(value: int) -> str:
    return f"The answer is {value}."


# --------------------------------------------------------------------------------- solutions
def _addition(a: int, b: int):
    """(correct solutions, wrong solutions) of a + b as [(text, value)]."""
    ta, oa, tb, ob = a // 10 * 10, a % 10, b // 10 * 10, b % 10
    v, tens, ones = a + b, ta + tb, oa + ob
    right = [(f"{a} + {b} = {v}. {_say(v)}", v),
             (f"Add the tens: {ta} + {tb} = {tens}. Add the ones: {oa} + {ob} = {ones}. "
              f"Together: {tens} + {ones} = {v}. {_say(v)}", v),
             (f"Count on from {a}: {a} + {tb} = {a + tb}, then {a + tb} + {ob} = {v}. "
              f"{_say(v)}", v)]
    dropped = tens + ones % 10
    wrong = [(f"Add the tens: {ta} + {tb} = {tens}. Add the ones: {oa} + {ob} = {ones}, "
              f"write down {ones % 10}. Together: {tens} + {ones % 10} = {dropped}. "
              f"{_say(dropped)}", dropped),
             (f"{a} + {b} = {v + 10}. {_say(v + 10)}", v + 10),
             (f"{a} + {b} = {v - 1}. {_say(v - 1)}", v - 1),
             (f"Add the tens: {ta} + {tb} = {tens}. Add the ones: {oa} + {ob} = {ones}. "
              f"Together: {tens} + {ones} = {v + 1}. {_say(v + 1)}", v + 1),
             (f"Subtract them: {a} - {b} = {a - b}. {_say(a - b)}", a - b)]
    return right, wrong


def _subtraction(a: int, b: int):
    """(correct, wrong) solutions of a - b (a > b, a borrow in the ones)."""
    ta, oa, tb, ob = a // 10 * 10, a % 10, b // 10 * 10, b % 10
    v = a - b
    right = [(f"{a} - {b} = {v}. {_say(v)}", v),
             (f"Take away the tens: {a} - {tb} = {a - tb}. Take away the ones: "
              f"{a - tb} - {ob} = {v}. {_say(v)}", v),
             (f"Count up from {b}: {b} + {v} = {a}, so the difference is {v}. {_say(v)}", v)]
    flipped = (ta - tb) + abs(oa - ob)
    wrong = [(f"Tens: {ta} - {tb} = {ta - tb}. Ones: {max(oa, ob)} - {min(oa, ob)} = "
              f"{abs(oa - ob)}. Together: {ta - tb} + {abs(oa - ob)} = {flipped}. "
              f"{_say(flipped)}", flipped),
             (f"{a} - {b} = {v + 1}. {_say(v + 1)}", v + 1),
             (f"{a} - {b} = {v - 10}. {_say(v - 10)}", v - 10),
             (f"Take away the tens: {a} - {tb} = {a - tb}. Take away the ones: "
              f"{a - tb} - {ob} = {v + 10}. {_say(v + 10)}", v + 10),
             (f"Add them: {a} + {b} = {a + b}. {_say(a + b)}", a + b)]
    return right, wrong


def _multiplication(a: int, b: int):
    """(correct, wrong) solutions of a × b (a two-digit, b one-digit)."""
    ta, oa = a // 10 * 10, a % 10
    v = a * b
    right = [(f"{a} × {b} = {v}. {_say(v)}", v),
             (f"Split {a} into {ta} + {oa}. {ta} × {b} = {ta * b} and {oa} × {b} = {oa * b}. "
              f"Then {ta * b} + {oa * b} = {v}. {_say(v)}", v),
             (f"{a} × {b} is {b} groups of {a}: {b} × {ta} = {b * ta} and {b} × {oa} = "
              f"{b * oa}, so {b * ta} + {b * oa} = {v}. {_say(v)}", v)]
    half = ta * b + oa
    wrong = [(f"Split {a} into {ta} + {oa}. {ta} × {b} = {ta * b}, then add {oa}: "
              f"{ta * b} + {oa} = {half}. {_say(half)}", half),
             (f"{a} × {b} = {a * (b - 1)}. {_say(a * (b - 1))}", a * (b - 1)),
             (f"{a} × {b} = {v + 10}. {_say(v + 10)}", v + 10),
             (f"Split {a} into {ta} + {oa}. {ta} × {b} = {ta * b} and {oa} × {b} = {oa * b}. "
              f"Then {ta * b} + {oa * b} = {v - 10}. {_say(v - 10)}", v - 10),
             (f"Add them: {a} + {b} = {a + b}. {_say(a + b)}", a + b)]
    return right, wrong


def _question(rng: random.Random, subset: str):
    """(question text, correct solutions, wrong solutions) of one question of `subset`."""
    if subset in ("addition", "word problems") and (subset == "addition" or rng.random() < 0.5):
        while True:
            a, b = rng.randint(12, 79), rng.randint(12, 79)
            if a % 10 + b % 10 >= 10:
                break
        sol = _addition(a, b)
        if subset == "addition":
            return f"What is {a} + {b}?", *sol
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        return (f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have "
                "now?", *sol)
    if subset in ("subtraction", "word problems"):
        while True:
            a, b = rng.randint(31, 98), rng.randint(12, 69)
            if a > b + 9 and a % 10 < b % 10:
                break
        sol = _subtraction(a, b)
        if subset == "subtraction":
            return f"What is {a} - {b}?", *sol
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        return (f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have "
                "left?", *sol)
    a, b = rng.randint(12, 49), rng.randint(3, 9)
    return f"What is {a} × {b}?", *_multiplication(a, b)


def make(seed: int = SEED) -> list:
    """The records of the demonstration file (deterministic for a seed)."""
    rng = random.Random(seed)
    records = []
    for subset in ("addition", "subtraction", "multiplication", "word problems"):
        for _ in range(PER_SUBSET):
            question, right, wrong = _question(rng, subset)
            n_right = rng.randint(1, 3)
            picked = rng.sample(right, n_right) + rng.sample(wrong, N_CANDIDATES - n_right)
            rng.shuffle(picked)
            records.append({"prompt": f"{question} Show your working briefly and end with "
                                      "'The answer is N.'",
                            "responses": [t for t, _ in picked],
                            "correct": [None] * len(picked),  # filled in by the check below
                            "answers": [str(v) for _, v in picked], "subset": subset})
    for rec in records:
        truth = true_answer(rec["prompt"])
        rec["correct"] = [final_answer(r) == truth for r in rec["responses"]]
    return records


# ------------------------------------------------------------------------------------- check
_ARITH = re.compile(r"^What is (\d+) ([+\-×]) (\d+)\?")
_GETS = re.compile(r"^\w+ has (\d+) \w+ and gets (\d+) more\.")
_GIVES = re.compile(r"^\w+ has (\d+) \w+ and gives away (\d+)\.")
_FINAL = re.compile(r"The answer is (-?\d+)\.$")


def true_answer(prompt: str) -> int:
    """The answer of a question, computed from its text."""
    m = _ARITH.match(prompt)
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return a + b if op == "+" else a - b if op == "-" else a * b
    m = _GETS.match(prompt)
    if m:
        return int(m.group(1)) + int(m.group(2))
    m = _GIVES.match(prompt)
    if m:
        return int(m.group(1)) - int(m.group(2))
    raise ValueError(f"cannot read the question {prompt!r}")


def final_answer(response: str) -> int:
    """The number after 'The answer is' at the end of a solution."""
    m = _FINAL.search(response)
    if not m:
        raise ValueError(f"no final answer in {response!r}")
    return int(m.group(1))


def check(records: list) -> None:
    """Raise ValueError unless every record's `correct` and `answers` agree with the answers
    recomputed from the question and read from the solutions, with at least one right and one
    wrong solution per record."""
    for k, rec in enumerate(records, 1):
        truth = true_answer(rec["prompt"])
        got = [final_answer(r) for r in rec["responses"]]
        if rec["correct"] != [g == truth for g in got]:
            raise ValueError(f"record {k}: 'correct' disagrees with the recomputed answer {truth}")
        if rec["answers"] != [str(g) for g in got]:
            raise ValueError(f"record {k}: 'answers' are not the solutions' final numbers")
        if all(rec["correct"]) or not any(rec["correct"]):
            raise ValueError(f"record {k}: needs right and wrong solutions")


def read(path: Path = OUT) -> list:
    """The records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check the shipped file")
    args = p.parse_args(argv)
    if not args.check:
        OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make()),
                       encoding="utf-8")
    records = read()
    check(records)
    n = sum(len(r["responses"]) for r in records)
    right = sum(sum(r["correct"]) for r in records)
    print(f"{OUT}: {len(records)} questions, {n} solutions, {right} correct: checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
