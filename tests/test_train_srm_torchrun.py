"""`torchrun --nproc-per-node 2 -m erm train-srm` on the embedded model (frozen backbone, a
handful of pairs, one step), then `erm eval --model OUT` on what rank 0 saved."""
import json
import os
import subprocess
import sys

from erm.sentence_rm import is_sentence_rm_dir

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "Berlin is the capital of Germany. Madrid is the capital of Spain."},
    {"prompt": "What is 2+2?", "chosen": "Two plus two equals four. It is not five.",
     "rejected": "I think the answer is 5."},
    {"prompt": "Say hi.", "chosen": "Hello! Nice to meet you.", "rejected": "No."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A colour. Maybe."},
]


def test_torchrun_train_srm_then_eval(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "srm"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "erm", "-q", "train-srm", "--data", str(data), "--eval", str(data), "--out",
         str(out), "--freeze-backbone", "--epochs", "1", "--batch-size", "4", "--attn-dim",
         "16", "--max-length", "128", "--save-every", "1", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert sum(line.startswith("epoch 1/1") for line in lines) == 1  # rank 0 alone prints
    summary = json.loads(lines[-1])
    assert summary["ranks"] == 2 and summary["steps"] == 1 and summary["pairs"] == 4
    assert is_sentence_rm_dir(out) and (out / "checkpoint" / "checkpoint.json").is_file()
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["pairs"] == 4 and "eval_accuracy" in history[0]
    ev = subprocess.run([sys.executable, "-m", "erm", "-q", "eval", "--data", str(data),
                         "--model", str(out), "--out", str(tmp_path / "eval.json")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n"] == 4 and any("SentenceRM" in m.get("label", "")
                                    for m in report["methods"].values())
