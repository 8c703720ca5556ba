"""erm.best_of_n (top-1 with ties split, random, oracle, majority vote, best-of-k curves), the
selectors (EndoRM.best_of_n, a SentenceRM), the built-in demonstration file and its check, and
`erm eval` on best-of-N files."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

import erm
from erm import best_of_n
from erm.best_of_n import BonItem
from erm.data import DataError
from tests.clitest import run_cli, tiny_model_dir, write_jsonl
from tests.tiny import tiny_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- numbers
def test_top1_splits_ties_and_ranks_nan_last():
    assert best_of_n.top1([1, 3, 3, 0], [False, True, False, True]) == 0.5
    assert best_of_n.top1([1, 3, 2], [False, True, False]) == 1.0
    assert best_of_n.top1([float("nan"), 1], [True, False]) == 0.0
    assert best_of_n.top1([float("nan")] * 2, [True, False]) == 0.5


def test_majority_vote():
    assert best_of_n.majority(["4", " 4", "5", None], [True, True, False, False]) == 1.0
    assert best_of_n.majority([4, 5], [True, False]) == 0.5      # a tie between answers
    assert best_of_n.majority(["5", "5", "4"], [False, False, True]) == 0.0
    assert best_of_n.majority([None, None], [True, False]) == 0.0


def test_subsets_and_pass_at_k():
    # k = 2 of 3: {0,1} picks 0 (wrong), {0,2} picks 0 (wrong), {1,2} picks 1 (right)
    assert best_of_n.subset_top1([3, 2, 1], [False, True, True], 2) == pytest.approx(1 / 3)
    assert best_of_n.subset_top1([3, 2, 1], [False, True, True], 1) == pytest.approx(2 / 3)
    assert best_of_n.subset_top1([3, 2, 1], [False, True, True], 5) == 0.0
    assert best_of_n.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert best_of_n.pass_at_k(4, 0, 4) == 0.0 and best_of_n.pass_at_k(3, 1, 3) == 1.0
    # more subsets than draws: sampled, reproducibly for a seeded generator
    import random
    scores, correct = list(range(12)), [k % 3 == 0 for k in range(12)]
    a = best_of_n.subset_top1(scores, correct, 6, draws=8, rng=random.Random(1))
    assert a == best_of_n.subset_top1(scores, correct, 6, draws=8, rng=random.Random(1))


def _items():
    return [BonItem("q1", ["a", "b", "c"], [False, True, True], ["1", "2", "2"], "x"),
            BonItem("q2", ["a", "b", "c", "d"], [True, False, False, False],
                    ["7", "8", "8", "9"], "y"),
            BonItem("q3", ["a", "b"], [False, True], ["3", "4"], "x")]


def test_report_by_hand():
    items = _items()
    rows = [[3, 2, 1], [5, 5, 0, 1], [0, 0]]
    rep = best_of_n.report(items, {"length": (rows, 0.5)})
    # top-1: q1 picks 0 (wrong); q2 ties 0 and 1 (1 of 2 right); q3 ties (1 of 2 right)
    m = rep["methods"]["length"]
    assert m["top1"] == pytest.approx((0 + .5 + .5) / 3)
    assert m["subsets"] == pytest.approx({"x": .25, "y": .5}) and m["ties"] == 2
    base = rep["baselines"]
    assert base["random"]["top1"] == pytest.approx((2 / 3 + 1 / 4 + 1 / 2) / 3)
    assert base["oracle"]["top1"] == 1.0
    assert base["majority"]["top1"] == pytest.approx((1 + 0 + .5) / 3)
    assert base["majority"]["subsets"] == pytest.approx({"x": .75, "y": 0.0})
    cur = rep["curves"]
    assert cur["k"] == [1, 2, 3, 4]
    assert cur["methods"]["length"][0] == pytest.approx(base["random"]["top1"])
    assert cur["methods"]["length"][-1] == pytest.approx(m["top1"])
    assert cur["pass@k"][0] == pytest.approx(base["random"]["top1"])
    assert cur["pass@k"][-1] == 1.0
    table = best_of_n.format_table(rep)
    for word in ("Length", "Random", "Majority", "Oracle", "overall"):
        assert word in table
    rep = best_of_n.report([BonItem("q", ["a", "b"], [True, False])], {"length": ([[1, 0]], 0)})
    assert "majority" not in rep["baselines"]


# ---------------------------------------------------------------------------------- reading
def test_load_and_variable_n(tmp_path):
    recs = [{"prompt": "2+2?", "responses": ["4", "5"], "correct": [True, False]},
            {"prompt": "3+3?", "responses": ["6", "7", "8"], "correct": [True, False, False],
             "subset": "add"}]
    items = best_of_n.load(write_jsonl(tmp_path / "b.jsonl", recs))
    assert [len(it.responses) for it in items] == [2, 3] and items[1].subset == "add"
    assert best_of_n.try_load(tmp_path / "b.jsonl") == items
    assert best_of_n.try_load(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"}])) is None


@pytest.mark.parametrize("change, message", [
    (lambda r: r["correct"].pop(), "'correct' must be a list of 2 bools"),
    (lambda r: r.pop("prompt"), "missing field(s) ['prompt']"),
    (lambda r: r.__setitem__("responses", ["4"]), "at least 2 responses"),
    (lambda r: r.__setitem__("correct", [1, 0]), "true/false"),
    (lambda r: r.__setitem__("answers", ["4"]), "'answers' must be a list of 2"),
])
def test_malformed_records_name_file_and_line(tmp_path, change, message):
    recs = [{"prompt": "2+2?", "responses": ["4", "5"], "correct": [True, False]}
            for _ in range(2)]
    change(recs[1])
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError) as e:
        best_of_n.load(path)
    assert str(e.value).startswith(f"{path}: line 2: ") and message in str(e.value)


def test_answers_on_some_records_only(tmp_path):
    recs = [{"prompt": "2+2?", "responses": ["4", "5"], "correct": [True, False],
             "answers": ["4", "5"]},
            {"prompt": "2+3?", "responses": ["5", "6"], "correct": [True, False]}]
    with pytest.raises(DataError, match="line 2: no 'answers'"):
        best_of_n.load(write_jsonl(tmp_path / "b.jsonl", recs))


# ---------------------------------------------------------------------------- built-in file
def _dev_script():
    spec = importlib.util.spec_from_file_location("make_bon_demo",
                                                  ROOT / "dev" / "make_bon_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_builtin_file_is_checked_and_reproducible():
    dev = _dev_script()
    shipped = dev.read(Path(str(best_of_n.default_data_path())))
    dev.check(shipped)
    assert shipped == dev.make()                     # the file is what the script writes
    items = best_of_n.load(best_of_n.default_data_path())
    assert len(items) == 32 and {it.subset for it in items} == {
        "addition", "subtraction", "multiplication", "word problems"}
    broken = json.loads(json.dumps(shipped[:2]))
    broken[1]["correct"][broken[1]["correct"].index(True)] = False
    with pytest.raises(ValueError, match="record 2: 'correct' disagrees"):
        dev.check(broken)


# ---------------------------------------------------------------------------------- selectors
@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer("llama", seed=0)


def test_selectors_endorm_and_sentence_rm(tiny):
    model, tok = tiny
    rm = erm.EndoRM(model, tok)
    cands = ["It is 4.", "It is 5.", "Four, I think."]
    for reduction in ("sum", "mean"):
        assert best_of_n.select(rm, "2+2?", cands, reduction=reduction) == \
            rm.best_of_n("2+2?", cands, reduction=reduction)
    srm = erm.SentenceRM(model, tok, attn_dim=16)
    ranked = best_of_n.select(srm, "2+2?", cands)
    want = srm.score(["2+2?"] * 3, cands).tolist()
    assert [i for i, _ in ranked] == sorted(range(3), key=lambda i: -want[i])
    items = [BonItem("2+2?", cands, [True, False, True]),
             BonItem("3+3?", ["6.", "Six.", "7."], [True, True, False])]
    for method, selector, kw in (("endorm_sum", rm, {"reduction": "sum"}),
                                 ("endorm_mean", rm, {"reduction": "mean"}),
                                 ("srm", srm, {})):
        rep = best_of_n.evaluate(rm, items, methods=(method,), srm=srm, progress=False)
        picks = [best_of_n.select(selector, it.prompt, it.responses, **kw)[0][0] for it in items]
        assert rep["methods"][method]["top1"] == pytest.approx(
            sum(it.correct[p] for it, p in zip(items, picks)) / 2)


# ---------------------------------------------------------------------------------- erm eval
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-bon"), "llama", seed=0)


def test_eval_builtin_best_of_n(tmp_path, model_dir, capsys):
    out, plot = tmp_path / "bon.json", tmp_path / "bon.png"
    rc, printed, err = run_cli(["eval", "--sample", "best-of-n", "--limit", "6", "--model",
                                model_dir, "--methods", "endorm_sum,endorm_mean,length",
                                "--reduction", "mean", "--out", str(out), "--plot", str(plot)],
                               capsys)
    assert rc == 0, err
    assert "6 best-of-N prompts from the built-in best-of-n sample" in printed
    for word in ("EndoRM (mean)", "Length", "Random", "Majority", "Oracle"):
        assert word in printed
    assert "EndoRM (sum)" not in printed            # --reduction mean: one EndoRM column
    rep = json.loads(out.read_text())
    assert list(rep["methods"]) == ["endorm_mean", "length"] and rep["n"] == 6
    assert rep["curves"]["k"] == [1, 2, 3, 4, 5, 6]
    assert plot.read_bytes().startswith(PNG)


def test_eval_best_of_n_file_errors(tmp_path, capsys):
    recs = [{"prompt": "2+2?", "responses": ["4", "5"], "correct": [True, False]},
            {"prompt": "2+3?", "responses": ["5", "6"], "correct": [True]}]
    bad = write_jsonl(tmp_path / "bad.jsonl", recs)
    rc, _, err = run_cli(["eval", "--data", str(bad), "--methods", "length"], capsys)
    assert rc == 2 and f"{bad}: line 2: 'correct'" in err
    good = write_jsonl(tmp_path / "good.jsonl", recs[:1])
    rc, _, err = run_cli(["eval", "--data", str(good), "--methods", "length", "--format",
                          "rmbench", "--out", str(tmp_path / "x.json")], capsys)
    assert rc == 2 and "RM-Bench" in err
    rc, _, err = run_cli(["eval", "--data", str(good), "--sample", "best-of-n"], capsys)
    assert rc == 2 and "leave out --data" in err
    rc, printed, err = run_cli(["eval", "--data", str(good), "--methods", "length"], capsys)
    assert rc == 0 and "Oracle" in printed
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl"]


def test_reduction_option_on_pairs_and_rewardbench(tmp_path, model_dir, capsys):
    from erm.cli.eval_bench import with_reduction
    assert with_reduction("endorm_sum,endorm_mean,judge", "mean") == "endorm_mean,judge"
    assert with_reduction("length,endorm_mean", "sum") == "length,endorm_sum"
    assert with_reduction("endorm_sum,length", None) == "endorm_sum,length"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4.",
                                                     "rejected": "5."}])
    out = tmp_path / "r.json"
    rc, _, err = run_cli(["eval", "--data", str(pairs), "--model", model_dir, "--methods",
                          "endorm_sum,length", "--reduction", "mean", "--out", str(out)], capsys)
    assert rc == 0, err
    assert list(json.loads(out.read_text())["methods"]) == ["endorm_mean", "length"]
    rb = write_jsonl(tmp_path / "rb.jsonl", [{"prompt": "2+2?", "chosen": "4.", "rejected": "5.",
                                               "subset": "math-prm"}])
    rc, _, err = run_cli(["eval", "--data", str(rb), "--model", model_dir, "--reduction", "mean",
                          "--out", str(out)], capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())["reduction"] == "mean"
