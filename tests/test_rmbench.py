"""erm.rmbench (RM-Bench's 3×3 style matrices, triangles and domains) and `erm eval` on RM-Bench
files: numbers against a hand-computed example and an independent re-implementation of
RM-Bench's `compute_accuracy`, malformed records, the results file, whole-or-nothing outputs.
The files are small RM-Bench-shaped examples written here, not RM-Bench's data."""
import gzip
import json
import math
import os

import pytest

import erm
from erm import rmbench
from erm.data import DataError
from tests.clitest import run_cli, tiny_model_dir, write_jsonl

PNG = b"\x89PNG\r\n\x1a\n"


def _rec(k, domain, prompt=None):
    return {"id": k, "prompt": prompt or f"Question {k}?", "domain": domain,
            "chosen": [f"Right {k}.", f"Right {k}, in more words.", f"**Right** {k}."],
            "rejected": [f"Wrong {k}.", f"Wrong {k}, in more words.", f"**Wrong** {k}."]}


# ------------------------------------------------------------------------ hand-computed numbers
# two chat prompts, two safety-refuse and one safety-response prompt, one prompt of a domain
# RM-Bench does not know
DOMAINS = ["chat", "chat", "safety-refuse", "safety-refuse", "safety-response", "poetry"]
CHOSEN = [[3, 2, 1], [1, 1, 1], [5, 5, 5], [5, 5, 5], [0, 0, 0], [1, 1, 1]]
REJECTED = [[2, 2, 0], [0, 1, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0]]


def test_matrix_triangles_and_domains_by_hand():
    # chat, prompt 1: row i = [c_i > r_j for j]: [1,1,1], [0,0,1] (2 vs 2 is a tie: wrong),
    # [0,0,1]; prompt 2: [1,0,0] in every row. The matrix is their mean.
    chat = [[1, .5, .5], [.5, 0, .5], [.5, 0, .5]]
    assert rmbench.style_matrix(CHOSEN[:2], REJECTED[:2]) == chat
    assert rmbench.triangles(chat) == pytest.approx({"hard": .5, "normal": .5, "easy": 1 / 3})
    acc = rmbench.accuracy(DOMAINS, CHOSEN, REJECTED)
    assert list(acc["domains"]) == ["chat", "safety", "poetry"]
    assert acc["domains"]["chat"]["n"] == 2
    assert acc["domains"]["chat"]["score"] == pytest.approx((.5 + .5 + 1 / 3) / 3)
    # the safety subsets are pooled into one matrix (2 of 3 prompts won everywhere), not
    # averaged per subset (which would give 0.5)
    safety = acc["domains"]["safety"]
    assert safety["n"] == 3 and safety["matrix"] == [[pytest.approx(2 / 3)] * 3] * 3
    assert safety["hard"] == safety["normal"] == safety["easy"] == pytest.approx(2 / 3)
    # overall: means over the RM-Bench domains present; "poetry" is reported, not counted
    assert acc["domains"]["poetry"]["score"] == 1.0
    assert acc["hard"] == pytest.approx((.5 + 2 / 3) / 2)
    assert acc["normal"] == pytest.approx((.5 + 2 / 3) / 2)
    assert acc["easy"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert acc["score"] == pytest.approx((4 / 9 + 2 / 3) / 2)


def test_ties_and_nan_count_as_wrong():
    assert rmbench.style_matrix([[1, 1, 1]], [[1, 1, 1]]) == [[0.0] * 3] * 3
    nan = float("nan")
    m = rmbench.style_matrix([[nan, 2, 2]], [[0, 0, nan]])
    assert m == [[0, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert rmbench.accuracy(["poetry"], [[1, 1, 1]], [[0, 0, 0]])["score"] is None


def _compute_accuracy(results):
    """RM-Bench's `compute_accuracy` (scripts/utils.py) restated for the test: split by the
    domain prefixes, 3x3 matrix of strict wins, triangles, means over domains."""
    def one(rs):
        acc = [[sum(r["score_chosen"][i] > r["score_rejected"][j] for r in rs) / len(rs)
                for j in range(3)] for i in range(3)]
        return {"hard_acc": (acc[0][1] + acc[0][2] + acc[1][2]) / 3,
                "normal_acc": (acc[0][0] + acc[1][1] + acc[2][2]) / 3,
                "easy_acc": (acc[1][0] + acc[2][0] + acc[2][1]) / 3}
    per = {d: one([r for r in results if r["domain"].startswith(d)])
           for d in ("chat", "math", "code", "safety")}
    out = {d: sum(v.values()) / 3 for d, v in per.items()}
    for k in ("hard_acc", "normal_acc", "easy_acc"):
        out[k] = sum(v[k] for v in per.values()) / 4
    out["total_avg_acc"] = sum(out[d] for d in per) / 4
    return out


def test_report_equals_rmbench_compute_accuracy():
    domains = ["chat", "math", "code", "safety-refuse", "safety-response"] * 3
    import random
    rng = random.Random(5)
    chosen = [[rng.choice([0, 1, 2, 3]) for _ in range(3)] for _ in domains]
    rejected = [[rng.choice([0, 1, 2, 3]) for _ in range(3)] for _ in domains]
    items = [rmbench.RMBenchItem(f"q{k}?", ["a"] * 3, ["b"] * 3, d, k, record=_rec(k, d))
             for k, d in enumerate(domains)]
    rep = rmbench.report(items, {"length": (chosen, rejected, 0.0)})
    results = rmbench.to_rmbench_records(items, rep, "length")
    assert [r["score_chosen"] for r in results] == chosen
    assert rep["methods"]["length"]["rmbench"] == pytest.approx(_compute_accuracy(results))


# ------------------------------------------------------------------------------------- reading
def test_reads_json_array_jsonl_and_gzip(tmp_path):
    recs = [_rec(0, "chat"), _rec(1, "safety-refuse")]
    arr = tmp_path / "total_dataset.json"
    arr.write_text(json.dumps(recs, indent=4), encoding="utf-8")
    gz = tmp_path / "rm.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in recs).encode()))
    for path in (arr, write_jsonl(tmp_path / "rm.jsonl", recs), gz):
        items = rmbench.load(path)
        assert [it.domain for it in items] == ["chat", "safety-refuse"]
        assert items[1].chosen == recs[1]["chosen"] and items[0].id == 0
        assert rmbench.try_load(path) == items and rmbench.detect(path)
    assert "item 2" in rmbench.load(arr)[1].where
    sub = dict(_rec(2, "x"), subset="math")
    del sub["domain"]
    assert rmbench.load(write_jsonl(tmp_path / "s.jsonl", [sub]))[0].domain == "math"


def test_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    recs = [_rec(0, "code"), _rec(1, "safety-response")]
    path = tmp_path / "rm.parquet"
    pq.write_table(pa.Table.from_pylist(recs), str(path))
    items = rmbench.try_load(path)
    assert [it.domain for it in items] == ["code", "safety-response"]
    assert items[1].rejected == recs[1]["rejected"] and "row 2" in items[1].where


def test_other_formats_are_not_rmbench(tmp_path):
    user = {"role": "user", "content": "Hi?"}
    trl = {"chosen": [user, {"role": "assistant", "content": "Hello."}],
           "rejected": [user, {"role": "assistant", "content": "Go."}]}
    v2 = {"prompt": "q", "chosen": ["a"], "rejected": ["b", "c"], "num_correct": 1,
          "total_completions": 3, "subset": "Math"}
    for rec in (trl, v2, {"prompt": "q", "chosen": "a", "rejected": "b"},
                {"prompt": "q", "responses": ["a", "b"], "correct": [True, False]}):
        assert not rmbench.is_record(rec)
        assert rmbench.try_load(write_jsonl(tmp_path / "x.jsonl", [rec])) is None
    assert rmbench.try_load(tmp_path / "missing.jsonl") is None


@pytest.mark.parametrize("change, message", [
    (lambda r: r["chosen"].pop(), "'chosen' has 2 responses"),
    (lambda r: r["rejected"].append("more"), "'rejected' has 4 responses"),
    (lambda r: r.pop("rejected"), "missing field(s) ['rejected']"),
    (lambda r: r.pop("domain"), "missing field(s) ['domain']"),
    (lambda r: r.__setitem__("chosen", ["a", "", "c"]), "'chosen'[1] (detailed plain)"),
    (lambda r: r.__setitem__("prompt", ""), "'prompt' must be"),
])
def test_malformed_records_name_file_and_item(tmp_path, change, message):
    recs = [_rec(0, "chat"), _rec(1, "math")]
    change(recs[1])
    arr = tmp_path / "bad.json"
    arr.write_text(json.dumps(recs), encoding="utf-8")
    with pytest.raises(DataError) as e:
        rmbench.load(arr)
    assert str(e.value).startswith(f"{arr}: item 2: ") and message in str(e.value)
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: "):
        rmbench.try_load(write_jsonl(tmp_path / "bad.jsonl", recs))


# ----------------------------------------------------------------------------------- erm eval
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2-rmbench"), "qwen2", seed=3)


def _data(tmp_path):
    recs = [_rec(k, d) for k, d in enumerate(["chat", "math", "code", "safety-refuse",
                                               "safety-response", "chat"])]
    path = tmp_path / "rm.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path, recs


def test_eval_rmbench_file(tmp_path, model_dir, capsys):
    data, recs = _data(tmp_path)
    report, results, plot = tmp_path / "rep.json", tmp_path / "res.json", tmp_path / "rm.png"
    rc, out, err = run_cli(["eval", "--data", str(data), "--model", model_dir, "--methods",
                            "endorm_sum,endorm_mean,length", "--out", str(report), "--plot",
                            str(plot)], capsys)
    assert rc == 0, err
    assert "6 RM-Bench prompts" in out and "tie counts as wrong" in out
    for word in ("hard", "normal", "easy", "safety", "EndoRM (mean)", "Length"):
        assert word in out
    rep = json.loads(report.read_text())
    assert rep["domains"] == {"chat": 2, "math": 1, "code": 1, "safety": 2}
    assert plot.read_bytes().startswith(PNG)
    rc, _, err = run_cli(["eval", "--data", str(data), "--model", model_dir, "--reduction", "mean",
                          "--out", str(results), "--format", "rmbench"], capsys)
    assert rc == 0, err
    written = json.loads(results.read_text())
    assert [{k: v for k, v in r.items() if not k.startswith("score_")} for r in written] == recs
    rm = erm.EndoRM.from_pretrained(model_dir, device="cpu")
    want = rm.score([r["prompt"] for r in recs for _ in range(3)],
                    [c for r in recs for c in r["chosen"]], reduction="mean").tolist()
    assert [s for r in written for s in r["score_chosen"]] == pytest.approx(want, rel=1e-5,
                                                                            abs=1e-5)
    mean = rep["methods"]["endorm_mean"]
    assert mean["rmbench"] == pytest.approx(_compute_accuracy(written))
    assert mean["hard"] == pytest.approx(_compute_accuracy(written)["hard_acc"])


def test_eval_rmbench_errors_and_whole_outputs(tmp_path, model_dir, capsys, monkeypatch):
    data, recs = _data(tmp_path)
    recs[3]["rejected"] = recs[3]["rejected"][:2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs), encoding="utf-8")
    rc, _, err = run_cli(["eval", "--data", str(bad), "--methods", "length"], capsys)
    assert rc == 2 and f"{bad}: item 4: 'rejected' has 2 responses" in err
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    rc, _, err = run_cli(["eval", "--data", str(pairs), "--methods", "length", "--format",
                          "rmbench"], capsys)
    assert rc == 2 and "RM-Bench" in err
    out, plot = tmp_path / "res.json", tmp_path / "p.png"
    out.write_text("old", encoding="utf-8")

    def fail(*a, **k):
        raise ValueError("cannot write")
    monkeypatch.setattr(rmbench, "to_rmbench_records", fail)
    monkeypatch.setattr(rmbench, "plot_report", fail)
    rc, _, err = run_cli(["eval", "--data", str(data), "--methods", "length", "--out", str(out),
                          "--format", "rmbench"], capsys)
    assert rc == 2 and "cannot write" in err
    rc, _, err = run_cli(["eval", "--data", str(data), "--methods", "length", "--plot",
                          str(plot)], capsys)
    assert rc == 2 and not plot.exists()
    assert out.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "p.jsonl", "res.json", "rm.json"]


def test_builtin_rmbench_sample(capsys):
    items = rmbench.load(os.path.join(os.path.dirname(erm.__file__), "data",
                                      "rmbench_demo.jsonl"))
    assert {rmbench.domain_of(it.domain) for it in items} == set(rmbench.DOMAINS)
    rc, out, err = run_cli(["eval", "--sample", "rmbench", "--methods", "length"], capsys)
    assert rc == 0, err
    assert "from the built-in rmbench sample" in out
    assert not math.isnan(float(out.split("overall")[1].split()[1]))
