"""The `erm` command line: score / eval / show round trips on a tiny model saved to disk (the
real `--model PATH` loading path), clean exit-2 errors naming file and line, checks made before
the model loads, atomic outputs, truncation reports (a stand-in reward model keeps these fast)."""
import bz2
import gzip
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import erm
from erm import cli
from erm.cli import eval as cli_eval
from erm.lm import TruncationWarning
from tests.clitest import tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=3)


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


def test_score_alpha_and_gamma_equal_the_library(tmp_path, model_dir, rm, capsys):
    """`erm score --alpha 0.5` writes EndoRM(alpha=0.5).score (and --gamma its γ); the values
    differ from α = 1, so the option reaches the model."""
    recs = [{"prompt": "What is the capital of France?", "response": "Paris."},
            {"prompt": "2+2?", "response": "It is 4, I think."}]
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    prompts, responses = [r["prompt"] for r in recs], [r["response"] for r in recs]
    for extra, kw in ((["--alpha", "0.5"], {"alpha": 0.5}),
                      (["--alpha", "0.5", "--gamma", "0.9"], {"alpha": 0.5, "gamma": 0.9})):
        rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--model", model_dir]
                          + extra, capsys)
        assert rc == 0, err
        got = [json.loads(x)["reward"] for x in dst.read_text().splitlines()]
        want = erm.EndoRM(rm.model, rm.tokenizer, **kw).score(prompts, responses)
        assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)
        assert got != pytest.approx(rm.score(prompts, responses).tolist(), abs=1e-4)


def test_eval_and_show_take_alpha(tmp_path, model_dir, rm, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.",
                                             "rejected": "Berlin, I think."}])
    report = tmp_path / "report.json"
    rc, _, err = _run(["eval", "--data", str(data), "--model", model_dir, "--alpha", "0.5",
                       "--methods", "endorm_sum", "--out", str(report)], capsys)
    assert rc == 0, err
    want = erm.EndoRM(rm.model, rm.tokenizer, alpha=0.5).score(
        ["Capital of France?"] * 2, ["Paris.", "Berlin, I think."])
    got = json.loads(report.read_text())["pairs"][0]["scores"]["endorm_sum"]
    assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)
    args = cli.build_parser().parse_args(["show", "--prompt", "p", "--response", "r", "--out",
                                          "t.html", "--alpha", "0.25", "--gamma", "0.5"])
    assert (args.alpha, args.gamma) == (0.25, 0.5)


def test_model_options_declared_once():
    """Every command takes its model options from one declaration: the same help text (the
    --model text aside) wherever an option appears; the scoring commands take --alpha and
    --gamma, score, eval and serve --device-map."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps, have = {}, {}
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.option_strings and a.dest in cli.options.MODEL_OPTIONS and a.dest != "model":
                helps.setdefault(a.dest, set()).add(a.help.split(" (default: ")[0])
                have.setdefault(name, set()).add(a.dest)
    assert all(len(h) == 1 for h in helps.values()), helps
    for name in ("score", "eval", "show", "serve", "rl"):
        assert {"alpha", "gamma"} <= have[name], name
    for name in ("score", "eval", "serve"):
        assert "device_map" in have[name], name


def test_alpha_gamma_and_device_map_checked_before_loading(tmp_path, capsys, monkeypatch):
    src, dst = _jsonl(tmp_path / "in.jsonl", _recs()), str(tmp_path / "out.jsonl")
    score = ["score", "--data", str(src), "--out", dst]
    for bad in (["--alpha", "0"], ["--alpha", "-1"], ["--alpha", "nan"], ["--alpha", "1e-5"],
                ["--alpha", "inf"], ["--gamma", "inf"], ["--gamma", "x"],
                ["--device-map", "everywhere"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(score + bad + NO_MODEL)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert bad[0] in err and "Traceback" not in err, (bad, err)
    cases = [(["--device-map", "auto", "--device", "cpu"] + NO_MODEL, "not both"),
             (["--device-map", "auto"], "needs --model")]
    for extra, message in cases:
        for cmd in (score, ["eval", "--limit", "2"]):
            rc, _, err = _run(cmd + extra, capsys)
            assert rc == 2 and message in err and "cannot load model" not in err, (extra, err)
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, _, err = _run(score + ["--device-map", "auto"] + NO_MODEL, capsys)
    assert rc == 2 and "torchrun" in err, err


def test_score_device_map(tmp_path, model_dir, rm, capsys):
    """--device-map auto loads through transformers' device_map (here all of it on the one
    device there is) and scores as --device does."""
    pytest.importorskip("accelerate")
    recs = [{"prompt": "Hi?", "response": "Hello there."}, {"prompt": "2+2?", "response": "4."}]
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--model", model_dir,
                       "--device-map", "auto", "--dtype", "float32"], capsys)
    assert rc == 0, err
    got = [json.loads(x)["reward"] for x in dst.read_text().splitlines()]
    want = rm.score([r["prompt"] for r in recs], [r["response"] for r in recs])
    assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)


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
    proc = subprocess.run([sys.executable, "-m", "erm", "rl", "--help"], capture_output=True,
                          text=True, cwd=str(tmp_path), env=env, timeout=120)
    assert proc.returncode == 0 and "usage: erm rl" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------ stand-in

class StandIn:
    """A stand-in reward model: reward = len(response). `check_pair` (when `checks`) refuses a
    response longer than `limit` characters; a prompt longer than `ctx` characters is "cut":
    a TruncationWarning naming its index, or ValueError with truncate=False. It declares the
    `erm.scoring.Scorer` attributes of an EndoRM (no causal LM behind it)."""

    kind, label, reductions = "endorm", "EndoRM", ("sum", "mean")
    batch_size = 8
    cuts_prompts = True
    max_length = system_prompt = tokenizer = causal_lm = None

    def __init__(self, limit=40, ctx=1000, checks=True):
        self.limit, self.ctx, self.calls = limit, ctx, []
        if not checks:  # a check_pair that lets every pair through
            self.check_pair = lambda prompt, response, **kw: None

    def _cut(self, prompts, truncate):
        cut = [i for i, p in enumerate(prompts) if len(p) > self.ctx]
        if cut and not truncate:
            raise ValueError(f"{len(cut)} prompt(s) do not fit")
        if cut:
            warnings.warn(TruncationWarning(f"{len(cut)} prompt(s) cut", cut))

    def check_pair(self, prompt, response, *, system_prompt=None, terminated=True,
                   truncate=True):
        if len(response) > self.limit:
            raise ValueError(f"the response has {len(response)} characters and does not fit")
        self._cut([prompt], truncate)

    def response_rewards(self, prompts, responses, *, system_prompt=None, progress=None,
                         truncate=True):
        self.calls.append(len(responses))
        self._cut(prompts, truncate)
        if any(len(r) > self.limit for r in responses):
            raise ValueError("the response does not fit")
        return (torch.tensor([float(len(r)) for r in responses]),
                torch.ones(len(responses), dtype=torch.int64))

    def score(self, prompts, responses, *, reduction="sum", system_prompt=None, progress=None,
              truncate=True):
        return self.response_rewards(prompts, responses, truncate=truncate)[0]


def _recs(n=3, **extra):
    return [{"prompt": f"prompt {i}", "response": f"response {i}", **extra} for i in range(n)]


NO_MODEL = ["--model", "/nonexistent/model"]  # a check made before loading must fire first


# ------------------------------------------------------------------------------------ outputs

def test_score_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", _recs())
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(src)
    os.link(src, tmp_path / "hard.jsonl")
    for out in (src, tmp_path / "sub" / ".." / "in.jsonl", tmp_path / "link.jsonl",
                tmp_path / "hard.jsonl"):
        for data in (str(src), os.path.relpath(src)):
            rc, _, err = _run(["score", "--data", data, "--out", str(out)] + NO_MODEL, capsys)
            assert rc == 2 and "is the input file" in err and "model" not in err, (out, err)
    assert src.read_bytes() == before


def test_score_writes_atomically(tmp_path, capsys, monkeypatch):
    src, dst = _jsonl(tmp_path / "in.jsonl", _recs(3)), tmp_path / "out.jsonl"
    dst.write_text("old\n")
    dst.chmod(0o640)
    real_dumps, n = json.dumps, []

    def failing_dumps(obj, **kw):  # the disk fills up after the first output line
        n.append("prompt" in obj)
        if sum(n) == 2:
            raise OSError(28, "No space left on device")
        return real_dumps(obj, **kw)

    monkeypatch.setattr(json, "dumps", failing_dumps)
    rc, out, err = _run(["score", "--data", str(src), "--out", str(dst)], capsys, rm=StandIn())
    monkeypatch.undo()  # a full disk is one line naming the output, not a traceback
    assert (rc, out) == (2, "") and err == f"erm: error: cannot write {dst}: No space left on " \
        "device\n", err
    assert dst.read_text() == "old\n"  # the part file stays, for --resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl",
                                                          "out.jsonl.part-0"]
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst)], capsys, rm=StandIn())
    assert rc == 0, err
    assert [json.loads(x)["reward"] for x in dst.read_text().splitlines()] == [10.0] * 3
    assert dst.stat().st_mode & 0o777 == 0o640  # the replaced file keeps its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_score_field(tmp_path, capsys):
    recs = _recs(2)
    recs[1]["reward"] = 0.5
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst)] + NO_MODEL, capsys)
    assert rc == 2 and f"{src}: line 2: the record already has a 'reward' field" in err, err
    assert "--field" in err and "--overwrite-field" in err and not dst.exists()
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--field", "endorm"],
                      capsys, rm=StandIn())
    assert rc == 0, err
    got = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [g["endorm"] for g in got] == [10.0, 10.0] and got[1]["reward"] == 0.5
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--overwrite-field"],
                      capsys, rm=StandIn())
    assert rc == 0, err
    got = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [g["reward"] for g in got] == [10.0, 10.0] and list(got[1]) == list(recs[1])
    for bad in ("prompt", "response", ""):
        rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--field", bad],
                          capsys, rm=StandIn())
        assert rc == 2 and "--field" in err, err


def test_output_paths_checked_before_loading(tmp_path, capsys, monkeypatch):
    src = _jsonl(tmp_path / "in.jsonl", _recs())
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False
                        if os.path.realpath(p) == str(ro) else real_access(p, mode, **kw))
    score = ["score", "--data", str(src), "--out"]
    evaluate = ["eval", "--data", str(pairs)]
    cases = [
        (score + [str(tmp_path / "dir")], "is a directory"),
        (score + [str(tmp_path / "nodir" / "o.jsonl")], "does not exist"),
        (score + [str(tmp_path / "file" / "o.jsonl")], "is not a directory"),
        (score + [str(ro / "o.jsonl")], "is not writable"),
        (evaluate + ["--out", str(tmp_path / "dir")], "is a directory"),
        (evaluate + ["--plot", str(tmp_path / "dir" / "x.txt")], "must end in"),
        (evaluate + ["--plot", str(ro / "r.png")], "is not writable"),
        (evaluate + ["--out", str(pairs)], "is the input file"),
        (["show", "--prompt", "p", "--response", "r", "--out", str(ro / "t.png")],
         "is not writable"),
    ]
    for argv, message in cases:
        rc, _, err = _run(argv + NO_MODEL, capsys)
        assert rc == 2 and message in err and "cannot load model" not in err, (argv, err)


def test_model_options_checked_before_loading(tmp_path, capsys, monkeypatch):
    src, dst = _jsonl(tmp_path / "in.jsonl", _recs()), str(tmp_path / "out.jsonl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [(["--batch-size", "0"], "--batch-size must be at least 1"),
             (["--batch-size", "-3"], "--batch-size must be at least 1"),
             (["--max-length", "1"], "--max-length must be at least 2"),
             (["--device", "cuda"], "CUDA is not available"),
             (["--device", "cuda:1"], "CUDA is not available"),
             (["--device", "gpu0"], "--device gpu0: not a torch device")]
    for extra, message in cases:
        for cmd in (["score", "--data", str(src), "--out", dst], ["eval", "--limit", "2"]):
            rc, _, err = _run(cmd + extra + NO_MODEL, capsys)
            assert rc == 2 and message in err and "Traceback" not in err, (extra, err)
            assert "cannot load model" not in err
    rc, _, err = _run(["show", "--prompt", "p", "--response", "r", "--out", dst + ".png",
                       "--device", "cuda"] + NO_MODEL, capsys)
    assert rc == 2 and "CUDA is not available" in err


# ------------------------------------------------------------------------------------ inputs

def test_score_and_eval_read_gzip(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl.gz", tmp_path / "out.jsonl"
    src.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in _recs(2)).encode()))
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst)], capsys, rm=StandIn())
    assert rc == 0, err
    assert len(dst.read_text().splitlines()) == 2
    pairs = tmp_path / "pairs.jsonl.gz"
    pairs.write_bytes(gzip.compress(b'{"prompt": "p", "chosen": "long one", "rejected": "b"}\n'))
    rc, out, err = _run(["eval", "--data", str(pairs), "--methods", "length"], capsys)
    assert rc == 0 and "100.0%" in out, err
    bz = tmp_path / "in.jsonl.bz2"
    bz.write_bytes(bz2.compress(src.read_bytes()))
    rc, _, err = _run(["score", "--data", str(bz), "--out", str(dst)] + NO_MODEL, capsys)
    assert rc == 2 and f"{bz}: bz2-compressed" in err, err
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n')
    rc, _, err = _run(["score", "--data", str(latin), "--out", str(dst)] + NO_MODEL, capsys)
    assert rc == 2 and f"{latin}: line 2: not valid UTF-8" in err, err


def test_pair_errors_name_the_line(tmp_path, capsys):
    recs = _recs(3)
    recs[2]["response"] = "x" * 100
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    rm = StandIn(limit=40)
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst)], capsys, rm=rm)
    assert rc == 2 and f"{src}: line 3: the response has 100 characters" in err, err
    assert rm.calls == [] and not dst.exists()  # checked before scoring
    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "y" * 50}])
    rc, _, err = _run(["eval", "--data", str(pairs), "--methods", "endorm_sum"], capsys, rm=rm)
    assert rc == 2 and f"{pairs}: line 2: the response has 50 characters" in err, err
    # a model whose check_pair lets the pair through: the error still names the data file
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst)], capsys,
                      rm=StandIn(checks=False))
    assert rc == 2 and f"{src}: the response does not fit" in err, err


@pytest.mark.skipif(not hasattr(erm.EndoRM, "check_pair"), reason="EndoRM has no check_pair")
def test_pair_errors_name_the_line_real_model(tmp_path, model_dir, capsys):
    recs = _recs(3)
    recs[1]["response"] = "The capital of France is Paris. " * 8
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--model", model_dir,
                       "--max-length", "16"], capsys)
    assert rc == 2 and f"{src}: line 2: " in err and "max_length" in err, err


# ------------------------------------------------------------------------------------ truncation

def test_truncation_reported_per_line(tmp_path, capsys):
    recs = _recs(4)
    recs[1]["prompt"] = recs[3]["prompt"] = "long prompt " * 10
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n" + "".join(json.dumps(r) + "\n" for r in recs))  # line = index + 2
    argv = ["score", "--data", str(src), "--out", str(dst)]
    rc, _, err = _run(argv, capsys, rm=StandIn(ctx=50))
    assert rc == 0, err  # -q: the count is still a warning, the rows need -v
    assert "2 prompt(s) truncated" in err and "line 3" not in err
    rc = cli.main(argv, rm=StandIn(ctx=50))
    err = capsys.readouterr().err
    assert rc == 0 and "-> " in err and "2 prompt(s) truncated" in err, err  # summary line
    for verbose in (["-v"] + argv, argv + ["--verbose"]):
        rc = cli.main(verbose, rm=StandIn(ctx=50))
        err = capsys.readouterr().err
        assert rc == 0
        assert f"warning: {src}: line 3: prompt truncated" in err
        assert f"warning: {src}: line 5: prompt truncated" in err and "line 4" not in err
    # --no-truncate: an error naming the line, before scoring
    rm = StandIn(ctx=50)
    rc, _, err = _run(argv + ["--no-truncate"], capsys, rm=rm)
    assert rc == 2 and f"{src}: line 3: the prompt does not fit" in err and rm.calls == [], err
    rc, _, err = _run(argv + ["--no-truncate"], capsys, rm=StandIn(ctx=50, checks=False))
    assert rc == 2 and f"{src}: 2 prompt(s) do not fit" in err, err


def test_eval_truncation_per_pair(tmp_path, capsys):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "long " * 20, "chosen": "aa", "rejected": "b"}])
    argv = ["-v", "eval", "--data", str(pairs), "--methods", "endorm_sum,length"]
    rc = cli.main(argv, rm=StandIn(ctx=50))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"warning: {pairs}: line 2: pair prompt truncated" in err and "line 1" not in err
    assert "1 pair prompt(s) truncated" in out
    rc, _, err = _run(argv[1:] + ["--no-truncate"], capsys, rm=StandIn(ctx=50))
    assert rc == 2 and f"{pairs}: line 2: the prompt does not fit" in err, err


@pytest.mark.skipif(not hasattr(erm.EndoRM, "check_pair"), reason="EndoRM has no check_pair")
def test_truncation_real_model(tmp_path, model_dir, capsys):
    recs = _recs(3)
    recs[2]["prompt"] = "What is the capital of France? " * 6
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    argv = ["-v", "score", "--data", str(src), "--out", str(dst), "--model", model_dir,
            "--max-length", "32"]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 0 and f"{src}: line 3: prompt truncated" in err and "1 prompt(s)" in err, err
    rc = cli.main(argv + ["--no-truncate"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{src}: line 3: " in err and "max_length" in err, err


# ------------------------------------------------------------------------------------ rl

def test_rl_is_a_built_in_subcommand():
    from erm.cli import rl
    assert not hasattr(cli, "EXTRA_COMMANDS")
    args = cli.build_parser().parse_args(["rl", "--steps", "1"])
    assert args.command == "rl" and args.func.__module__ == rl.__name__


# ------------------------------------------------------------------------------ rewardbench
def test_eval_rewardbench_v1_file(tmp_path, model_dir, capsys):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}.",
             "chosen_model": "x", "rejected_model": "y", "subset": s, "id": i}
            for i, s in enumerate(["alpacaeval-easy", "mt-bench-med", "math-prm",
                                   "refusals-dangerous"])]
    data = _jsonl(tmp_path / "rb.jsonl", rows)
    out = tmp_path / "results.json"
    rc, printed, err = _run(["eval", "--data", str(data), "--model", model_dir, "--out", str(out),
                             "--format", "rewardbench"], capsys)
    assert rc == 0, err
    assert "RewardBench v1" in printed
    for section in ("Chat", "Reasoning", "Safety", "Score"):
        assert section in printed
    res = json.loads(out.read_text())
    assert res["model"] == model_dir and "alpacaeval-easy" in res
    assert all(0 <= res[s] <= 1 for s in ("alpacaeval-easy", "mt-bench-med", "math-prm"))
    rc, _, err = _run(["eval", "--data", str(_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"}])), "--format", "rewardbench",
        "--methods", "length"], capsys)
    assert rc == 2 and "RewardBench" in err


def test_serve_is_registered():
    args = cli.build_parser().parse_args(["serve", "--port", "8123"])
    assert args.command == "serve" and args.port == 8123 and callable(args.func)


# ------------------------------------------------------------------------- sentence-level RM
def test_train_srm_then_eval_and_show_it(tmp_path, model_dir, capsys):
    pairs = [{"prompt": f"Q{i}?", "chosen": f"Yes. It is {i}.", "rejected": f"No. Not {i}.",
              "subset": "s"} for i in range(4)]
    data = _jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "srm"
    rc, _, err = _run(["train-srm", "--data", str(data), "--out", str(out), "--model", model_dir,
                       "--freeze-backbone", "--epochs", "1"], capsys)
    assert rc == 0, err
    report = tmp_path / "report.json"
    rc, printed, err = _run(["eval", "--data", str(data), "--model", str(out), "--out",
                             str(report), "--methods", "endorm_sum,length"], capsys)
    assert rc == 0, err
    assert "SentenceRM" in printed and "EndoRM (sum)" in printed
    assert set(json.loads(report.read_text())["methods"]) == {"endorm_sum", "length", "srm"}
    page = tmp_path / "s.html"
    rc, _, err = _run(["show", "--model", str(out), "--prompt", "Q1?", "--response",
                       "Yes. It is 1.", "--out", str(page)], capsys)
    assert rc == 0, err
    html = page.read_text()
    assert "sentence 0" in html and "weight" in html


class Crashing(StandIn):
    """A stand-in that scores 8 rows a chunk (batch size 1) and fails in its second chunk."""

    batch_size = 1

    def __init__(self, reduction_scale=False, crash=True):
        super().__init__()
        self.scale, self.crash = reduction_scale, crash

    def score(self, prompts, responses, *, reduction="sum", **kw):
        if self.crash and len(self.calls) == 1:
            raise RuntimeError("the node went down")
        out = super().score(prompts, responses, **kw)
        return out / 10 if self.scale and reduction == "mean" else out


def _crash(argv, capsys, rm=None):
    """Run `erm score` until it crashes in its second chunk, leaving OUT.part-0 behind."""
    with pytest.raises(RuntimeError, match="went down"):
        cli.main(["-q", "score"] + argv, rm=rm or Crashing())
    capsys.readouterr()


def test_score_resume_scores_only_the_missing_rows(tmp_path, capsys):
    src, dst = _jsonl(tmp_path / "in.jsonl", _recs(20)), tmp_path / "out.jsonl"
    _crash(["--data", str(src), "--out", str(dst)], capsys)
    header = (tmp_path / "out.jsonl.part-0").read_text().splitlines()[0]  # the run's fingerprint
    (tmp_path / "out.jsonl.part-0").unlink()
    part = tmp_path / "out.jsonl.part-1"  # left by rank 1 of an earlier two-rank run
    part.write_text(header + "\n" + "".join(json.dumps({"index": i, "value": -1.0}) + "\n"
                                            for i in range(10, 20)) + '{"index": 3, "val')  # torn
    rm = Crashing(crash=False)
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--resume"], capsys, rm=rm)
    assert rc == 0, err
    assert sum(rm.calls) == 10                        # rows 0-9 only
    got = [json.loads(x)["reward"] for x in dst.read_text().splitlines()]
    assert got == [float(len(f"response {i}")) for i in range(10)] + [-1.0] * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    part.write_text(json.dumps({"index": 0, "value": -1.0}) + "\n")  # without --resume: ignored
    rm = StandIn()
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst)], capsys, rm=rm)
    assert rc == 0 and sum(rm.calls) == 20
    assert json.loads(dst.read_text().splitlines()[0])["reward"] == float(len("response 0"))


def test_score_resume_refuses_parts_of_another_run(tmp_path, capsys):
    """Parts written with another reduction, input, system prompt or field are not mixed in."""
    src, dst = _jsonl(tmp_path / "in.jsonl", _recs(20)), tmp_path / "out.jsonl"
    base = ["--data", str(src), "--out", str(dst)]
    _crash(base + ["--reduction", "mean"], capsys, rm=Crashing(reduction_scale=True))
    kept = (tmp_path / "out.jsonl.part-0").read_text()
    assert len(kept.splitlines()) == 9  # the header and the first chunk
    for extra, what in ((["--reduction", "sum"], "reduction: 'mean' there, 'sum' now"),
                        (["--system-prompt", "Be terse."], "system_prompt"),
                        (["--field", "score"], "field"),
                        (["--reduction", "mean", "--no-truncate"], "truncate")):
        rm = Crashing(reduction_scale=True)
        rc, _, err = _run(["score"] + base + extra + ["--resume"], capsys, rm=rm)
        assert rc == 2 and what in err and "out.jsonl.part-0" in err, (extra, err)
        assert "without --resume" in err and not rm.calls
        assert (tmp_path / "out.jsonl.part-0").read_text() == kept  # left for a matching resume
    _jsonl(src, _recs(20, tag=1))  # the input changed
    rc, _, err = _run(["score"] + base + ["--reduction", "mean", "--resume"], capsys,
                      rm=Crashing(reduction_scale=True))
    assert rc == 2 and "data_sha256" in err
    _jsonl(src, _recs(20))
    rm = Crashing(reduction_scale=True, crash=False)
    rc, _, err = _run(["score"] + base + ["--reduction", "mean", "--resume"], capsys, rm=rm)
    assert rc == 0, err
    assert sum(rm.calls) == 12  # only the rows the crash lost
    got = [json.loads(x)["reward"] for x in dst.read_text().splitlines()]
    assert got == pytest.approx([len(f"response {i}") / 10 for i in range(20)])
    assert not list(tmp_path.glob("out.jsonl.part-*"))


def test_train_srm_device_checked_before_loading(tmp_path, capsys, monkeypatch):
    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = _run(["train-srm", "--data", str(data), "--out", str(tmp_path / "srm"),
                       "--device", "cuda"] + NO_MODEL, capsys)
    assert rc == 2 and "--device cuda: CUDA is not available" in err and "Traceback" not in err
    assert not (tmp_path / "srm").exists()


@pytest.fixture(scope="module")
def srm_dirs(tmp_path_factory, model_dir):
    """Two SentenceRMs trained on the tiny model: aggregate "attention" and "last"."""
    d = tmp_path_factory.mktemp("srms")
    pairs = [{"prompt": f"Q{i}?", "chosen": f"Yes. It is {i}.", "rejected": f"No. Not {i}.",
              "subset": "s"} for i in range(4)]
    data = _jsonl(d / "pairs.jsonl", pairs)
    out = {}
    for agg in ("attention", "last"):
        out[agg] = str(d / agg)
        assert cli.main(["-q", "train-srm", "--data", str(data), "--out", out[agg], "--model",
                         model_dir, "--freeze-backbone", "--epochs", "1", "--aggregate",
                         agg]) == 0
    return {"data": str(data), **out}


def test_eval_compares_several_sentence_rms(tmp_path, srm_dirs, capsys):
    """Repeated --model: one column per SentenceRM, named after its aggregate, beside EndoRM."""
    report = tmp_path / "report.json"
    rc, printed, err = _run(["eval", "--data", srm_dirs["data"], "--model", srm_dirs["attention"],
                             "--model", srm_dirs["last"], "--methods", "endorm_sum",
                             "--out", str(report)], capsys)
    assert rc == 0, err
    rep = json.loads(report.read_text())
    assert list(rep["methods"]) == ["endorm_sum", "srm_attention", "srm_last"]
    assert rep["methods"]["srm_last"]["label"] == "SentenceRM (last)"
    assert "SentenceRM (attention)" in printed and "SentenceRM (last)" in printed
    want = erm.SentenceRM.from_pretrained(srm_dirs["last"], device="cpu").score(
        ["Q0?", "Q0?"], ["Yes. It is 0.", "No. Not 0."])
    assert rep["pairs"][0]["scores"]["srm_last"] == pytest.approx(want.tolist(), abs=1e-5)
    assert cli_eval.srm_columns(["a/x", "b/y"], ["last", "last"]) == {"srm_last_x": "a/x",
                                                                 "srm_last_y": "b/y"}
    rc, _, err = _run(["eval", "--data", srm_dirs["data"], "--model", "/nonexistent/a",
                       "--model", "/nonexistent/b"], capsys)
    assert rc == 2 and "at most one EndoRM model" in err


def test_eval_model_options_reach_every_model(srm_dirs):
    """--system-prompt, --batch-size and --max-length reach every model `erm eval` loads: the
    EndoRM, the first SentenceRM column (loaded beside its base model's EndoRM) and the others."""
    args = cli.build_parser().parse_args(
        ["eval", "--model", srm_dirs["attention"], "--model", srm_dirs["last"], "--device", "cpu",
         "--max-length", "40", "--batch-size", "3", "--system-prompt", ""])
    endo, srms, methods = cli_eval._load_eval_models(args, None, ["endorm_sum"],
                                                     cli_eval._split_models(args))
    assert methods == ["endorm_sum", "srm_attention", "srm_last"]
    for model in (endo, srms["srm_attention"], srms["srm_last"]):
        assert (model.max_length, model.batch_size, model.system_prompt) == (40, 3, "")


def test_score_and_rewardbench_eval_take_a_sentence_rm(tmp_path, srm_dirs, capsys):
    recs = [{"prompt": "Q1?", "response": "Yes. It is 1."}, {"prompt": "Q2?", "response": "No."}]
    src, dst = _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl"
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--model",
                       srm_dirs["attention"]], capsys)
    assert rc == 0, err
    srm = erm.SentenceRM.from_pretrained(srm_dirs["attention"], device="cpu")
    want = srm.score([r["prompt"] for r in recs], [r["response"] for r in recs])
    got = [json.loads(x)["reward"] for x in dst.read_text().splitlines()]
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--model",
                       srm_dirs["attention"], "--reduction", "mean"], capsys)
    assert rc == 2 and "SentenceRM" in err and "--reduction" in err
    for extra in (["--alpha", "0.5"], ["--gamma", "0.9"]):  # options only an EndoRM has
        rc, _, err = _run(["score", "--data", str(src), "--out", str(dst), "--model",
                           srm_dirs["attention"]] + extra, capsys)
        assert rc == 2 and "SentenceRM" in err and extra[0] in err, err
    rows = [{"prompt": f"Q{i}?", "chosen": f"Yes. It is {i}.", "rejected": f"No. Not {i}.",
             "subset": s, "id": i} for i, s in enumerate(["alpacaeval-easy", "math-prm"])]
    out = tmp_path / "rb.json"
    rc, printed, err = _run(["eval", "--data", str(_jsonl(tmp_path / "rb.jsonl", rows)),
                             "--model", srm_dirs["attention"], "--out", str(out)], capsys)
    assert rc == 0, err
    assert "RewardBench v1" in printed and "SentenceRM, attention" in printed
    rep = json.loads(out.read_text())
    assert rep["reduction"] == "SentenceRM (attention)"
    want = srm.score(["Q0?", "Q0?"], ["Yes. It is 0.", "No. Not 0."])
    assert rep["items"][0]["scores"] == pytest.approx(want.tolist(), abs=1e-5)


def test_score_fingerprint_covers_a_sentence_rm_and_its_backbone(tmp_path, srm_dirs):
    """--resume compares a SentenceRM's head weights, its saved config and its backbone's
    weights by content, not by the directory's name."""
    import argparse
    import shutil

    from erm.cli import score as cli_score
    d = tmp_path / "srm"
    shutil.copytree(srm_dirs["attention"], d)
    src = _jsonl(tmp_path / "in.jsonl", _recs(1))
    args = argparse.Namespace(model=str(d), system_prompt=None, reduction=None,
                              no_truncate=False, data=str(src))
    srm = erm.SentenceRM.from_pretrained(str(d), device="cpu")

    def fingerprint():
        return cli_score._score_fingerprint(args, srm, "reward", False)

    before = fingerprint()
    assert before["scorer"] == "SentenceRM (attention)" and before["reduction"] is None
    assert before["backbone_weights"]["files"] and before["weights"]["files"]
    assert fingerprint() == before
    cfg = d / "sentence_rm.json"
    cfg.write_text(cfg.read_text() + " ")
    assert fingerprint()["sentence_rm_config_sha256"] != before["sentence_rm_config_sha256"]
    head = d / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 1
    head.write_bytes(bytes(data))
    assert fingerprint()["weights"] != before["weights"]
