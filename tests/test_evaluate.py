"""erm.evaluate (data formats, accuracy, report) and erm.judge (the Yes/No generative verifier)."""
import json
import math
import types

import pytest
import torch

from erm.data import DataError, Pair, load_pairs
from erm.evaluate import evaluate, format_table, plot_report
from erm.judge import judge_messages, judge_scores
from tests.tiny import tiny_model_and_tokenizer


def _write(tmp_path, lines, name="pairs.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
                 encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer("llama", seed=0)


# ------------------------------------------------------------------------------------ formats

def test_load_prompt_chosen_rejected(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    p = _write(tmp_path, [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome.",
         "subset": "facts", "extra": 1},
        "",  # blank lines are skipped
        {"prompt": msgs, "chosen": "4", "rejected": "5"},
    ])
    pairs = load_pairs(p)
    assert pairs == [Pair("Capital of France?", "Paris.", "Rome.", "facts"),
                     Pair(msgs, "4", "5", "default")]
    assert load_pairs([{"prompt": "a", "chosen": "b", "rejected": "c"}]) == [Pair("a", "b", "c")]


def test_load_message_lists():
    user = {"role": "user", "content": "Hi?"}
    # TRL implicit prompt: the shared prefix of chosen and rejected
    rec = {"chosen": [user, {"role": "assistant", "content": "Hello!"}],
           "rejected": [user, {"role": "assistant", "content": "Go away."}], "subset": "s"}
    assert load_pairs([rec]) == [Pair([user], "Hello!", "Go away.", "s")]
    # TRL explicit prompt, completions as one assistant message
    rec = {"prompt": [user], "chosen": [{"role": "assistant", "content": "A"}],
           "rejected": [{"role": "assistant", "content": "B"}]}
    assert load_pairs([rec]) == [Pair([user], "A", "B")]
    # a string prompt with full conversations that repeat it
    rec = {"prompt": "Hi?", "chosen": [user, {"role": "assistant", "content": "A"}],
           "rejected": [user, {"role": "assistant", "content": "B"}]}
    assert load_pairs([rec]) == [Pair([user], "A", "B")]


def test_load_hh_rlhf(tmp_path):
    prefix = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?"
    p = _write(tmp_path, [{"chosen": prefix + "\n\nAssistant: 6.",
                           "rejected": prefix + "\n\nAssistant: It is 7, I think."}])
    (pair,) = load_pairs(p)
    assert pair.prompt == [{"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": "4."},
                           {"role": "user", "content": "And 3+3?"}]
    assert (pair.chosen, pair.rejected, pair.subset) == ("6.", "It is 7, I think.", "default")
    # without the leading blank line, as some copies of the data set have it
    (pair,) = load_pairs([{"chosen": "Human: Hi\n\nAssistant: Hello",
                           "rejected": "Human: Hi\n\nAssistant: Bye"}])
    assert pair == Pair([{"role": "user", "content": "Hi"}], "Hello", "Bye")


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "p", "chosen": "a"}', "missing key 'rejected'"),
    ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "must both be strings"),
    ('{"prompt": "p", "chosen": "a", "rejected": ["b"]}', "must both be strings"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "'prompt' must be a string"),
    ('{"prompt": "p", "chosen": "  ", "rejected": "b"}', "'chosen' response is empty"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "subset": 5}', "'subset'"),
    ('{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}', "'prompt': message 0"),
    ('{"chosen": [{"role": "user", "content": "q"}], '
     '"rejected": [{"role": "user", "content": "q"}]}', "must end with an assistant message"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", '
     '"rejected": "\\n\\nHuman: b\\n\\nAssistant: y"}', "differ before the last"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", '
     '"rejected": "\\n\\nHuman: a\\n\\nAssistant:   "}', "'rejected' response is empty"),
    ('{"chosen": "no turns", "rejected": "no turns either"}', "no '\\n\\nAssistant:' turn"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    p = _write(tmp_path, [good, "", line, good])
    with pytest.raises(DataError) as info:
        load_pairs(p)
    text = str(info.value)
    assert text.startswith(f"{p}: line 3: "), text
    assert message in text, text


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no preference pairs"):
        load_pairs(_write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match=r"<list>: item 2: missing key 'chosen'"):
        load_pairs([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p"}])


# ------------------------------------------------------------------------------------ evaluate

class StubRM:
    """response_rewards() returns sums from a table keyed by response and 2 tokens each (so the
    mean is half the sum); each call is recorded."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def response_rewards(self, prompts, responses, *, progress=None, system_prompt=None):
        self.calls.append((system_prompt, len(responses)))
        sums = torch.tensor([self.table[r] for r in responses], dtype=torch.float32)
        return sums, torch.full((len(responses),), 2, dtype=torch.int64)


def test_accuracy_ties_count_half():
    pairs = [Pair("p1", "aa", "bb", "x"),      # length tie; stub: chosen wins
             Pair("p2", "ccc", "d", "x"),      # longer chosen; stub: tie
             Pair("p3", "e", "ffff", "y"),     # shorter chosen; stub: rejected wins
             Pair("p4", "gg", "hh", "y")]      # length tie; stub: NaN loses
    rm = StubRM({"aa": 2.0, "bb": 1.0, "ccc": 5.0, "d": 5.0, "e": 0.0, "ffff": 1.0,
                 "gg": math.nan, "hh": 0.0})
    rep = evaluate(rm, pairs, methods=("endorm_sum", "endorm_mean", "length"), progress=False,
                   system_prompt="sys")
    assert rm.calls == [("sys", 8)]  # sum and mean come from one scoring pass
    assert rep["n"] == 4 and rep["subsets"] == {"x": 2, "y": 2}
    s, ln = rep["methods"]["endorm_sum"], rep["methods"]["length"]
    assert s["accuracy"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert s["subsets"] == {"x": 0.75, "y": 0.0} and s["ties"] == 1
    assert ln["accuracy"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert ln["subsets"] == {"x": 0.75, "y": 0.25} and ln["ties"] == 2
    assert rep["methods"]["endorm_mean"]["accuracy"] == s["accuracy"]
    assert all(m["seconds"] >= 0 for m in rep["methods"].values())
    row = rep["pairs"][3]
    assert row["scores"]["endorm_sum"] == [None, 0.0] and row["chosen"] == "gg"
    assert row["scores"]["length"] == [2.0, 2.0] and row["prompt"] == "p4"
    assert rep["pairs"][1]["outcome"] == {"endorm_sum": 0.5, "endorm_mean": 0.5, "length": 1.0}
    json.dumps(rep, allow_nan=False)  # strict JSON
    table = format_table(rep)
    assert "EndoRM (sum)" in table and "Length" in table and "overall" in table
    assert "37.5%" in table and "50.0%" in table and "75.0%" in table


def test_evaluate_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown methods"):
        evaluate(None, [Pair("p", "a", "b")], methods=("bogus",))
    with pytest.raises(ValueError, match="no preference pairs"):
        evaluate(None, [], methods=("length",))
    rep = evaluate(None, [{"prompt": "p", "chosen": "aa", "rejected": "b"}],
                   methods=("length",), progress=False)  # dicts are loaded
    assert rep["methods"]["length"]["accuracy"] == 1.0


def test_evaluate_tiny_model_all_methods(tiny, tmp_path):
    import erm
    model, tok = tiny
    rm = erm.EndoRM(model, tok, batch_size=3)
    pairs = load_pairs([
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Berlin.",
         "subset": "a"},
        {"prompt": [{"role": "user", "content": "Two plus two?"}], "chosen": "Four.",
         "rejected": "It is five, I think.", "subset": "b"},
        {"chosen": "\n\nHuman: Hello\n\nAssistant: Hi! How can I help?",
         "rejected": "\n\nHuman: Hello\n\nAssistant: Go away.", "subset": "b"},
    ])
    rep = evaluate(rm, pairs, progress=False)
    assert list(rep["methods"]) == ["endorm_sum", "endorm_mean", "judge", "length"]
    prompts = [p.prompt for p in pairs]
    for method, red in (("endorm_sum", "sum"), ("endorm_mean", "mean")):
        want = rm.score(prompts, [p.chosen for p in pairs], reduction=red)
        got = [row["scores"][method][0] for row in rep["pairs"]]
        assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)
    want = judge_scores(rm, prompts, [p.rejected for p in pairs])
    got = [row["scores"]["judge"][1] for row in rep["pairs"]]
    assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)
    for m, r in rep["methods"].items():
        outcomes = [row["outcome"][m] for row in rep["pairs"]]
        assert r["accuracy"] == pytest.approx(sum(outcomes) / 3)
    plot_report(rep, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ judge

def _direct_judge(model, tok, prompt, response):
    """log p(Yes) − log p(No) from an unpadded float64 forward pass, teacher-forcing each
    answer's tokens as they follow the generation prompt."""
    text = tok.apply_chat_template(judge_messages(prompt, response), tokenize=False,
                                   add_generation_prompt=True)
    prefix = tok(text, add_special_tokens=False)["input_ids"]
    out = 0.0
    for answer, sign in (("Yes", 1.0), ("No", -1.0)):
        full = tok(text + answer, add_special_tokens=False)["input_ids"]
        assert full[:len(prefix)] == prefix
        ans = full[len(prefix):]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        out += sign * sum(float(lp[len(prefix) - 1 + j, a]) for j, a in enumerate(ans))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_judge_matches_direct_float64(arch):
    model, tok = tiny_model_and_tokenizer(arch, seed=1)
    # "No" is two tokens for the tiny tokenizer: the multi-token path is exercised too
    assert len(tok("No", add_special_tokens=False)["input_ids"]) > 1
    prompts = ["What is 2+2?", [{"role": "user", "content": "Hello there, who are you?"}],
               "Name a colour.", "Capital of Germany? Answer briefly and correctly please."]
    responses = ["4.", "I am a helpful assistant.", "Blue", "Berlin is the capital of Germany."]
    got = judge_scores(types.SimpleNamespace(model=model, tokenizer=tok), prompts, responses,
                       batch_size=3)  # several batches of left-padded sequences
    assert got.dtype == torch.float32 and got.shape == (4,)
    model64 = tiny_model_and_tokenizer(arch, seed=1)[0].double()
    want = [_direct_judge(model64, tok, p, r) for p, r in zip(prompts, responses)]
    assert got.tolist() == pytest.approx(want, abs=2e-4, rel=1e-4)
    assert len(set(round(x, 3) for x in want)) == 4  # the scores are not all the same


def test_judge_warns_when_it_cuts_an_input():
    from erm import EndoRM
    from erm.lm import TruncationWarning

    model, tok = tiny_model_and_tokenizer("llama", seed=1)
    rm = EndoRM(model, tok)
    with pytest.warns(TruncationWarning, match="1 judge input") as rec:
        judge_scores(rm, ["Hi", "x " * 300], ["Hello.", "Yes."], max_length=200)
    assert [w.message.indices for w in rec] == [[1]]
