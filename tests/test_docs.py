"""The documentation a user reads stays true: every `erm` command shown in a ```bash block of
README.md or docs/*.md parses with erm's own argument parser (an option that does not exist, a
bad choice or a missing required option fails), every relative link and image points at a file
that exists (and at a heading that exists, for `page.md#anchor`), every `erm.name` and
`from erm... import name` the pages show resolves, every source path they name (`erm/...`,
`kernels/...`, `tests/...`) exists, and the README opens with the test command CI runs."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

from erm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_SEPARATORS = {"&&", "||", ";", "|", "&"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _shell_lines(text: str):
    """(line number, logical line) of every ```bash/sh block, backslash continuations joined."""
    for m in _FENCE.finditer(text):
        if m.group(1) not in ("bash", "sh", "shell", "console"):
            continue
        first = text.count("\n", 0, m.start(2)) + 1
        pending, start = "", None
        for i, line in enumerate(m.group(2).splitlines()):
            if start is None:
                start = first + i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending, start = "", None


def _words(line: str):
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True  # '#' starts a comment, as in bash
    return list(lex)


def erm_argv(line: str):
    """The argument lists of the `erm` invocations of one shell line: `erm ...`,
    `.venv/bin/erm ...`, `python -m erm ...`, `torchrun ... -m erm ...`."""
    commands, cur = [], []
    for w in _words(line):
        if w in _SEPARATORS:
            commands.append(cur)
            cur = []
        else:
            cur.append(w)
    commands.append(cur)
    out = []
    for words in commands:
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words = words[1:]                                 # VAR=value prefixes
        if words and Path(words[0]).name == "erm":
            out.append(words[1:])
            continue
        for i in range(len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "erm":
                out.append(words[i + 2:])
                break
    return out


def _commands():
    found = []
    for page in PAGES:
        for lineno, line in _shell_lines(page.read_text(encoding="utf-8")):
            for argv in erm_argv(line):
                found.append(pytest.param(argv, id=f"{_rel(page)}:{lineno}"))
    return found


COMMANDS = _commands()


def parse(argv):
    """Parse `argv` as the `erm` command does; an argparse error is an AssertionError with its
    message."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"erm {shlex.join(argv)}: {err.getvalue().strip() or exc}") from None
    assert getattr(args, "func", None) is not None, f"erm {shlex.join(argv)}: no command"
    return args


def test_the_docs_show_commands_of_every_kind():
    names = {argv[0] for argv in (p.values[0] for p in COMMANDS) if argv and
             not argv[0].startswith("-")}
    assert {"score", "eval", "show", "serve", "rl", "train-srm"} <= names, names
    assert len(COMMANDS) >= 30, len(COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS)
def test_command_parses(argv):
    parse(argv)


@pytest.mark.parametrize("line", [
    "erm score --data in.jsonl --out out.jsonl --no-such-option",
    "erm eval --format csv",
    "erm score --data in.jsonl",
    "bash dev/setup.sh && .venv/bin/erm evaluate",
    "torchrun --nproc-per-node 2 -m erm rl --objective ppo",
])
def test_a_wrong_command_fails(line):
    (argv,) = erm_argv(line)
    with pytest.raises(AssertionError):
        parse(argv)


def test_commands_are_found_where_the_docs_put_them():
    text = ("```bash\nbash dev/setup.sh && .venv/bin/erm eval --plot eval.png  # main job\n"
            "erm score --data a.jsonl \\\n    --out b.jsonl\ncurl -s localhost:8000/score\n"
            "FOO=1 python -m erm show --prompt \"a # b\" --response x --out t.html\n```\n"
            "```python\nerm score --nothing\n```\n")
    found = [argv for _, line in _shell_lines(text) for argv in erm_argv(line)]
    assert found == [["eval", "--plot", "eval.png"],
                     ["score", "--data", "a.jsonl", "--out", "b.jsonl"],
                     ["show", "--prompt", "a # b", "--response", "x", "--out", "t.html"]]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(page: Path):
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue                                          # http:, https:, mailto:
        yield target


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_files_that_exist(page):
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{_rel(page)}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            slugs = {_slug(h) for h in _HEADING.findall(_FENCE.sub("", dest.read_text("utf-8")))}
            assert anchor in slugs, f"{_rel(page)}: link to {target}: no such heading"


def test_every_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {_rel(page)}"


def test_the_readme_opens_with_the_ci_test_command_and_stays_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    first = _FENCE.search(text)
    assert first and first.group(1) == "bash"
    assert text[:first.start()].strip().startswith("# "), "the title, then the commands"
    opening = [ln.split("#")[0].strip() for ln in first.group(2).splitlines()]
    assert ci[-1].strip() in opening, (ci[-1], opening)
    assert len(text.splitlines()) <= README_MAX_LINES


# ------------------------------------------------------------------------------------------
# names and paths

_DOTTED = re.compile(r"(?<![\w.])erm(?:\.[A-Za-z_]\w*)+")
_FROM_IMPORT = re.compile(r"from\s+(erm(?:\.\w+)*)\s+import\s+([\w ,]+)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_SOURCE_DIRS = ("erm/", "kernels/", "csrc/", "tests/", "benches/", "dev/", "docs/", ".ci/")
# installed names with no module of that name in the source tree: the folder they are built from
_INSTALLED = {"erm.kernels": "kernels", "erm._C": "csrc"}


def _code_of(text: str) -> str:
    """The ```python blocks and the inline code spans of a page's text."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang == "python"]
    return "\n".join(blocks + _CODE_SPAN.findall(_FENCE.sub("", text)))


def resolve(dotted: str):
    """The object `erm.a.b.c` names, importing submodules as needed; AttributeError if none."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i + 1]))
        except ModuleNotFoundError:
            raise AttributeError(f"{dotted}: no {part!r} in {'.'.join(parts[:i])}") from None
    return obj


def _names(code: str):
    for m in _DOTTED.finditer(code):
        yield m.group(0)
    for module, names in _FROM_IMPORT.findall(code):
        for name in filter(None, (n.strip() for n in names.split(","))):
            yield f"{module}.{name}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_erm_names_shown_exist(page):
    missing = []
    for name in sorted(set(_names(_code_of(page.read_text(encoding="utf-8"))))):
        root = next((k for k in _INSTALLED if name == k or name.startswith(k + ".")), None)
        if root is not None:
            assert (ROOT / _INSTALLED[root]).is_dir(), name
            continue
        try:
            resolve(name)
        except AttributeError as exc:
            missing.append(str(exc))
    assert not missing, f"{_rel(page)}: " + "; ".join(missing)


def test_names_are_found_and_checked():
    code = _code_of("```python\nimport erm\nst = erm.token_stats(z, t).logprob\n"
                    "from erm.integrations.trl import use_erm_logprobs, entropy_from_logits\n```\n"
                    "Prose with `erm.lm` and `x.erm.not_a_name`.\n")
    assert sorted(set(_names(code))) == ["erm.integrations.trl",
                                         "erm.integrations.trl.entropy_from_logits",
                                         "erm.integrations.trl.use_erm_logprobs", "erm.lm",
                                         "erm.token_stats"]
    with pytest.raises(AttributeError):
        resolve("erm.token_stats_of_nothing")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_source_paths_named_exist(page):
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    missing = [span for span in _CODE_SPAN.findall(text)
               if span.startswith(_SOURCE_DIRS) and re.fullmatch(r"[\w./-]+", span)
               and not (ROOT / span).exists()]
    assert not missing, f"{_rel(page)} names paths that do not exist: {missing}"
