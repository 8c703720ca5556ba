"""erm.rewardbench: RewardBench v1/v2 files read, scored and reported as RewardBench does."""
import json
import math

import pytest
import torch

import erm
from erm import rewardbench as rb
from erm.data import DataError
from tests.tiny import tiny_model_and_tokenizer


class TableRM:
    """A stand-in reward model: each response's score is looked up in a table."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def response_rewards(self, prompts, responses, **kw):
        self.calls += 1
        return (torch.tensor([float(self.table[r]) for r in responses]),
                torch.ones(len(responses), dtype=torch.int64))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


V1 = [  # (subset, chosen score, rejected score)
    ("alpacaeval-easy", 3, 1), ("alpacaeval-easy", 1, 1),          # a tie loses: 0.5
    ("mt-bench-med", 2, 0),                                         # 1.0
    ("math-prm", 5, 4), ("math-prm", 0, 4),                         # 0.5
    ("hep-python", 9, 1),                                           # 1.0
    ("refusals-dangerous", 0, 1),                                   # 0.0
    ("anthropic_helpful", 1, 0),                                    # not in a section
]


def _v1_rows():
    rows, table = [], {}
    for i, (subset, c, r) in enumerate(V1):
        rows.append({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}",
                     "chosen_model": "x", "rejected_model": "y", "subset": subset, "id": i})
        table[f"c{i}"], table[f"r{i}"] = c, r
    return rows, table


def test_v1_sections_weighted_as_rewardbench(tmp_path):
    rows, table = _v1_rows()
    path = _jsonl(tmp_path / "rb1.jsonl", rows)
    assert rb.detect(path) == "v1" and rb.is_rewardbench(path)
    data = rb.load(path)
    assert data.version == "v1" and len(data) == len(V1)
    rm = TableRM(table)
    rep = rb.evaluate(rm, data, model="table")
    assert rm.calls == 1                                    # one batched call for every pair
    sub = {k: v["score"] for k, v in rep["subsets"].items()}
    assert sub == {"alpacaeval-easy": 0.5, "mt-bench-med": 1.0, "math-prm": 0.5,
                   "hep-python": 1.0, "refusals-dangerous": 0.0, "anthropic_helpful": 1.0}
    chat = (0.5 * 100 + 1.0 * 40) / 140
    reasoning = (0.5 * 984 + 1.0 * 164) / (984 + 164)
    assert rep["sections"] == pytest.approx({"Chat": chat, "Chat Hard": None,
                                             "Safety": 0.0, "Reasoning": reasoning})
    assert rep["score"] == pytest.approx((chat + reasoning + 0.0) / 3)
    assert [it["result"] for it in rep["items"]] == [1, 0, 1, 1, 0, 1, 0, 1]
    table_text = rb.format_table(rep)
    assert "Chat Hard" in table_text and "Reasoning" in table_text and "57.1" in table_text
    out = rb.to_rewardbench_json(rep)
    assert out["model"] == "table" and out["math-prm"] == 0.5 and "chat_template" in out
    rb.write_rewardbench_json(rep, tmp_path / "res.json", model="org/m")
    text = (tmp_path / "res.json").read_text()
    assert json.loads(text)["model"] == "org/m"
    assert text == json.dumps(json.loads(text), indent=4, sort_keys=True)


# v2: prompt rows; the first completion is the (first) correct one
V2 = [
    ("Factuality", "f0", {"f_c": 5}, {"f_1": 1, "f_2": 5, "f_3": 0}),  # tied at the best: 1/2
    ("Factuality", "f1", {"g_c": 0}, {"g_1": 1, "g_2": -1, "g_3": -2}),  # 0
    ("Math", "m0", {"m_c": 9}, {"m_1": 1, "m_2": 2, "m_3": 3}),          # 1
    ("Ties", "ref:0", {"r_c1": 5}, {"r_i1": 1, "r_i2": 2}),
    ("Ties", "tied:0", {"t_c1": 6, "t_c2": 4}, {"t_i1": 3}),
    ("Ties", "tied:1", {"u_c1": 1, "u_c2": 2}, {"u_i": 3}),
]


def _v2_rows():
    rows, table = [], {}
    for subset, rid, chosen, rejected in V2:
        rows.append({"id": rid, "prompt": f"prompt {rid}", "chosen": list(chosen),
                     "rejected": list(rejected), "num_correct": len(chosen),
                     "num_rejected": len(rejected),
                     "total_completions": len(chosen) + len(rejected),
                     "models": ["a"], "subset": subset, "additional_metadata": None})
        table.update(chosen)
        table.update(rejected)
    return rows, table


def test_v2_best_of_n_and_ties_as_rewardbench_2(tmp_path):
    rows, table = _v2_rows()
    path = _jsonl(tmp_path / "rb2.jsonl", rows)
    assert rb.detect(path) == "v2"
    rep = rb.evaluate(TableRM(table), path)
    sub = {k: v["score"] for k, v in rep["subsets"].items()}
    # Ties by hand: acc(ref) = 1, acc(tied) = 1/2; on prompt 0 the correct-incorrect margin
    # (tied 1, ref 3) does not beat the spread of correct answers (2): 0 and 0; ratio 1/2
    ties = 0.3 * 0.5 + 0.3 * 1.0 + 0.2 * 0 + 0.2 * 0 + 0.01 * math.tanh(0.5 - 1)
    assert sub["Factuality"] == 0.25 and sub["Math"] == 1.0
    assert sub["Ties"] == pytest.approx(ties)
    assert rep["score"] == pytest.approx((0.25 + 1.0 + ties) / 3)
    assert [it["result"] for it in rep["items"]][:3] == [0.5, 0.0, 1.0]
    assert "sections" not in rep and "Ties" in rb.format_table(rep)
    assert rb.to_rewardbench_json(rep, model="m")["Ties"] == pytest.approx(ties)


def test_parquet_reads_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    for rows, table in (_v1_rows(), _v2_rows()):
        rows = [{k: v for k, v in r.items() if k != "additional_metadata"} for r in rows]
        pq = tmp_path / "rb.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(pq))
        js = _jsonl(tmp_path / "rb.jsonl", rows)
        a = rb.evaluate(TableRM(table), pq)
        b = rb.evaluate(TableRM(table), js)
        assert a["subsets"] == b["subsets"] and a["score"] == b["score"]
        assert rb.detect(pq) == rb.detect(js)


def test_load_reads_a_file_once(tmp_path, monkeypatch):
    """`load` and `try_load` detect the version from the records they read, not a second read."""
    rows, _ = _v1_rows()
    path = _jsonl(tmp_path / "rb1.jsonl", rows)
    reads, real = [], rb.read_records
    monkeypatch.setattr(rb, "read_records", lambda *a, **k: reads.append(a) or real(*a, **k))
    data = rb.load(path)
    assert len(reads) == 1 and data.version == "v1" and len(data) == len(V1)
    assert rb.try_load(path).items == data.items and len(reads) == 2
    plain = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert rb.try_load(plain) is None and rb.try_load(tmp_path / "missing.jsonl") is None
    datasets = pytest.importorskip("datasets")
    pq = tmp_path / "rb.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    opened, from_parquet = [], datasets.Dataset.from_parquet
    monkeypatch.setattr(datasets.Dataset, "from_parquet",
                        lambda *a, **k: opened.append(a) or from_parquet(*a, **k))
    assert rb.load(pq).items == data.items and len(opened) == 1


def test_a_scorer_without_truncate_works(tmp_path):
    """`truncate` is passed only when False, so a stand-in scorer without it keeps working."""
    rows, table = _v1_rows()

    class NoTruncate:
        def response_rewards(self, prompts, responses, *, system_prompt=None, progress=None):
            return TableRM(table).response_rewards(prompts, responses)

    data = rb.load(_jsonl(tmp_path / "rb1.jsonl", rows))
    assert rb.score(NoTruncate(), data) == rb.score(TableRM(table), data)


def test_detection_and_errors(tmp_path):
    plain = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c",
                                               "subset": "arithmetic"}])
    assert rb.detect(plain) is None and not rb.is_rewardbench(plain)
    with pytest.raises(DataError, match="not a RewardBench file"):
        rb.load(plain)
    with pytest.raises(FileNotFoundError):
        rb.load(tmp_path / "missing.jsonl")
    rows, _ = _v2_rows()
    rows[2]["total_completions"] = 7
    with pytest.raises(DataError, match=r"rb2.jsonl: line 3: total_completions is 7"):
        rb.load(_jsonl(tmp_path / "rb2.jsonl", rows))
    rows, _ = _v2_rows()
    rows[3]["id"] = "3"
    with pytest.raises(DataError, match="line 4: a Ties row needs an id"):
        rb.load(_jsonl(tmp_path / "rb2.jsonl", rows))
    rows, _ = _v1_rows()
    rows[1]["rejected"] = "   "
    with pytest.raises(DataError, match="line 2"):
        rb.load(_jsonl(tmp_path / "rb1.jsonl", rows))


def test_scores_with_a_real_endorm(tmp_path, one_thread):
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    rm = erm.EndoRM(model, tok)
    rows, _ = _v2_rows()
    rows[0]["chosen"] = ["Paris is the capital of France."]
    rows[0]["rejected"][1] = ""                                    # an empty completion loses
    data = rb.load(_jsonl(tmp_path / "rb2.jsonl", rows))
    sc = rb.score(rm, data, reduction="mean")
    assert sc[0][2] == float("-inf") and all(math.isfinite(x) for x in sc[0][:2] + sc[0][3:])
    want = rm.score(["prompt f0"] * 2, ["Paris is the capital of France.", "f_1"],
                    reduction="mean").tolist()
    assert [sc[0][0], sc[0][1]] == pytest.approx(want, rel=1e-5, abs=1e-5)
    rep = rb.report(data, sc, model="tiny")
    assert rep["n"] == len(V2) and -0.01 <= rep["score"] <= 1.01   # Ties margin term: ±0.01
    assert rep["items"][0]["scores"][2] is None                 # -inf written as null
    json.dumps(rep, allow_nan=False)
