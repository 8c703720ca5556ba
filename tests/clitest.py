"""What the `erm` command-line tests share: JSONL files written from records, `erm` run
in-process with its output captured, and a tiny random model saved to a folder.

    from tests.clitest import run_cli, tiny_model_dir, write_jsonl
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    rc, out, err = run_cli(["eval", "--data", str(path), "--methods", "length"], capsys)
"""
import json

from erm import cli
from tests.tiny import tiny_model_and_tokenizer


def write_jsonl(path, recs):
    """`recs` written to `path` (a pathlib.Path) as JSONL, one JSON value a line; `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `erm -q ARGV` run in-process (pytest's `capsys`)."""
    rc = cli.main(["-q"] + argv)
    out, err = capsys.readouterr()
    return rc, out, err


def tiny_model_dir(folder, arch: str = "llama", seed: int = 0) -> str:
    """`tiny_model_and_tokenizer(arch, seed)` saved with `save_pretrained` in `folder` (an
    existing directory, e.g. from `tmp_path_factory.mktemp`); the folder as a string."""
    model, tok = tiny_model_and_tokenizer(arch, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
