"""The `erm` command line: score / eval / show round trips on a tiny model saved to disk (the
real `--model PATH` loading path), and clean exit-2 errors."""
import json
import os
import subprocess
import sys

import pytest

import erm
from erm import cli
from tests.tiny import tiny_model_and_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = tiny_model_and_tokenizer("qwen2", seed=3)
    d = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def rm(model_dir):
    return erm.EndoRM.from_pretrained(model_dir, device="cpu")


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def _run(argv, capsys, **kw):
    rc = cli.main(["-q"] + argv, **kw)
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------ score

def test_score_round_trip(tmp_path, model_dir, rm, capsys):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    recs = [{"prompt": "What is the capital of France?", "response": "Paris.", "id": 7},
            {"prompt": chat, "response": "Hello! How can I help?", "meta": {"k": [1, 2]}},
            {"prompt": "2+2?", "response": "It is 4."}]
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    for reduction in ("sum", "mean"):
        rc, out, err = _run(["score", "--data", str(src), "--out", str(dst), "--model", model_dir,
                             "--reduction", reduction, "--batch-size", "2"], capsys)
        assert rc == 0, err
        got = [json.loads(line) for line in dst.read_text().splitlines()]
        assert [{k: v for k, v in g.items() if k != "reward"} for g in got] == recs
        want = rm.score([r["prompt"] for r in recs], [r["response"] for r in recs],
                        reduction=reduction)
        assert [g["reward"] for g in got] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)


def test_score_system_prompt_and_hook(tmp_path, rm, capsys):
    recs = [{"prompt": "Hi?", "response": "Hello."}]
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--system-prompt",
                       "You are terse."], capsys, rm=rm)
    assert rc == 0, err
    got = json.loads(dst.read_text())["reward"]
    want = float(rm.score("Hi?", "Hello.", system_prompt="You are terse.")[0])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert got != pytest.approx(float(rm.score("Hi?", "Hello.")[0]), abs=1e-6)


# ------------------------------------------------------------------------------------ eval

def test_eval_round_trip(tmp_path, model_dir, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Berlin, I think.",
         "subset": "facts"},
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5",
         "subset": "math"},
        {"prompt": "3+3?", "chosen": "6", "rejected": "It is 7.", "subset": "math"},
    ])
    report, plot = tmp_path / "report.json", tmp_path / "report.png"
    rc, out, err = _run(["eval", "--data", str(data), "--model", model_dir, "--out", str(report),
                         "--plot", str(plot)], capsys)
    assert rc == 0, err
    for label in ("EndoRM (sum)", "EndoRM (mean)", "Judge (Yes/No)", "Length", "facts", "math",
                  "overall", "seconds"):
        assert label in out
    assert max(len(line) for line in out.splitlines()[1:]) <= 100  # fits a terminal
    rep = json.loads(report.read_text())
    assert rep["n"] == 3 and rep["subsets"] == {"facts": 1, "math": 2}
    assert set(rep["methods"]) == {"endorm_sum", "endorm_mean", "judge", "length"}
    # length: the rejected response is longer twice, "4" vs "5" is a tie (half a win)
    assert rep["methods"]["length"]["accuracy"] == pytest.approx(0.5 / 3)
    assert len(rep["pairs"]) == 3 and rep["model"] == model_dir
    assert plot.read_bytes()[:8] == PNG and plot.stat().st_size > 10_000


def test_eval_builtin_sample_and_hh(tmp_path, rm, capsys):
    rc, out, err = _run(["eval", "--limit", "8", "--methods", "length,endorm_mean",
                         "--out", str(tmp_path / "r.json")], capsys, rm=rm)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["n"] == 8 and len(rep["subsets"]) == 4  # the sample interleaves its subsets
    assert list(rep["methods"]) == ["length", "endorm_mean"]
    assert "built-in sample" in out
    hh = _jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
         "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 5\n\nHuman: Sure?\n\nAssistant: Sorry, 4.",
         "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5\n\nHuman: Sure?\n\nAssistant: Yes."}])
    rc, out, err = _run(["eval", "--data", str(hh), "--methods", "endorm_sum,length"], capsys,
                        rm=rm)
    assert rc == 0, err
    assert "default" in out and "100.0%" in out


# ------------------------------------------------------------------------------------ show

def test_show_html_and_png(tmp_path, model_dir, rm, capsys):
    prompt = "What is the capital of France?"
    response = "The capital is Paris. It is <big> & old!\nBerlin is in Germany."
    html_path, png_path = tmp_path / "tokens.html", tmp_path / "tokens.png"
    rc, _, err = _run(["show", "--prompt", prompt, "--response", response, "--out",
                       str(html_path), "--model", model_dir], capsys)
    assert rc == 0, err
    page = html_path.read_text(encoding="utf-8")
    tr = rm.token_rewards(prompt, response)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert page.count('class="tok') == len(tr.tokens)
    assert page.count("title=") == len(tr.tokens)
    assert "&lt;big&gt; &amp; old!" in page  # escaped
    assert f"reward {float(tr.rewards[0]):+.4f}" in page and "logprob" in page
    for s in rm.sentence_rewards(prompt, response):
        assert f"{s.reward:+.3f}" in page
    rc, _, err = _run(["show", "--prompt", prompt, "--response", response * 4, "--out",
                       str(png_path)], capsys, rm=rm)
    assert rc == 0, err
    assert png_path.read_bytes()[:8] == PNG and png_path.stat().st_size > 10_000


# ------------------------------------------------------------------------------------ errors

def test_errors_exit_2_without_traceback(tmp_path, rm, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"\n')
    cases = [
        (["eval", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["eval", "--data", str(bad)], f"{bad}: line 2: invalid JSON"),
        (["eval", "--limit", "0"], "--limit"),
        (["eval", "--methods", "endorm_sum,bogus"], "bogus"),
        (["eval", "--plot", str(tmp_path / "x.txt")], "--plot"),
        (["score", "--data", str(bad), "--out", str(tmp_path / "o.jsonl")],
         f"{bad}: line 1: missing key 'response'"),
        (["show", "--prompt", "p", "--response", "r", "--out", str(tmp_path / "x.txt")],
         "must end in"),
        (["show", "--prompt", "p", "--response", "  ", "--out", str(tmp_path / "x.html")],
         "empty"),
        (["show", "--prompt", "p", "--out", str(tmp_path / "x.html")], "--response"),
    ]
    for argv, message in cases:
        rc, out, err = _run(argv, capsys, rm=rm)
        assert rc == 2, (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.startswith("erm: error: "), err
    rc, _, err = _run(["eval", "--model", str(tmp_path / "no-such-model")], capsys)
    assert rc == 2 and "no-such-model" in err and "Traceback" not in err
    assert cli.main([]) == 2  # no subcommand: usage


def test_python_dash_m(tmp_path):
    """`python -m erm` runs the CLI and exits 2 on a missing file, with one clean line."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "erm", "eval", "--data",
                           str(tmp_path / "nope.jsonl")], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"erm: error: {tmp_path / 'nope.jsonl'}: no such file"
