"""The GPU check fits one prepared run: benches/gpu_session.sh's plan (step limits within the
budget, every step's command present and its arguments accepted) and bounded autotuning."""
import importlib.util
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "gpu_session.sh"
BUDGET = {"essential": 480, "extra": 300}


def _plan(*args):
    proc = subprocess.run(["bash", str(SCRIPT), "--plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    steps = []
    for line in lines[:-1]:
        name, limit, cmd = line.split("\t", 2)
        steps.append((name, int(limit), shlex.split(cmd)))
    last = lines[-1].split("\t")
    assert last[0] == "total", lines[-1]
    return steps, int(last[1])


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_command(argv):
    """The program a step runs exists and accepts its arguments; returns the script run, if any."""
    while argv and argv[0] == "env":  # env VAR=value ... command
        argv = argv[1:]
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            argv = argv[1:]
    prog, args = argv[0], argv[1:]
    if prog == "compute-sanitizer":
        tool = args[args.index("--tool") + 1]
        assert tool in ("memcheck", "racecheck")
        return _check_command(args[args.index("python3"):])
    if prog == "bash":
        assert args[0] == "-c"
        subprocess.run(["bash", "-n", "-c", args[1]], check=True, timeout=30)
        return None
    if prog == "nvidia-smi":
        return None
    assert prog == "python3", argv
    if args[0] == "-c":
        compile(args[1], "<step>", "exec")
        return None
    if args[:2] == ["-m", "pytest"]:
        files = [a for a in args if a.startswith("tests/")]
        assert files and all((ROOT / f).is_file() for f in files), files
        return None
    path = ROOT / args[0]
    assert path.is_file(), path
    mod = _load(path)
    mod.parser().parse_args(args[1:])  # exits (SystemExit) on an unknown or malformed flag
    return args[0]


@pytest.mark.parametrize("which", ["essential", "extra"])
def test_plan_limits_fit_the_budget(which):
    steps, total = _plan(*([] if which == "essential" else ["extra"]))
    assert total == sum(limit for _, limit, _ in steps)
    assert 0 < total <= BUDGET[which]
    assert all(limit > 0 for _, limit, _ in steps)
    assert len({name for name, _, _ in steps}) == len(steps)


@pytest.mark.parametrize("which", ["essential", "extra"])
def test_every_step_command_exists_and_parses(which):
    steps, _ = _plan(*([] if which == "essential" else ["extra"]))
    for name, _, argv in steps:
        _check_command(argv)


def test_essential_pass_covers_the_check():
    steps, _ = _plan()
    by_name = {name: argv for name, _, argv in steps}
    assert {"build", "tests", "tests_linear", "memcheck", "racecheck", "token_stats", "linear",
            "score"} <= set(by_name)
    assert "MAX_JOBS=16" in by_name["build"][-2]
    tested = by_name["tests"] + by_name["tests_linear"]
    for f in ("test_token_stats", "test_endogenous", "test_linear_token_stats", "test_dispatch"):
        assert f"tests/{f}.py" in tested
    assert any(a.startswith("--maxfail") for a in by_name["tests"])
    assert any(a.startswith("--maxfail") for a in by_name["tests_linear"])
    for name in ("tests", "tests_linear", "memcheck", "racecheck"):  # no search under these
        assert "ERM_AUTOTUNE=pinned" in by_name[name], name
    outs = [a for _, _, argv in steps for a in argv if a.startswith("OUT/")]
    assert {"OUT/token_stats-GPU.json", "OUT/linear-GPU.json", "OUT/score-GPU.json"} <= set(outs)
    assert len(outs) + 1 <= 8  # with the tarball: at most 8 files come back


def test_extra_pass_variants():
    steps, _ = _plan("extra")
    text = " ".join(" ".join(argv) for _, _, argv in steps)
    for v in ("32000", "128256", "262144"):
        assert f"--v {v}" in text
    assert "--dtype float32" in text and "benches/bench_rl_step.py" in text
    outs = [a for _, _, argv in steps for a in argv if a.startswith("OUT/")]
    assert len(outs) + 1 <= 8


def test_usage_errors():
    for args in ([], ["--plan", "nonsense"], ["OUT", "nonsense"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and "usage" in proc.stderr


# ---------------------------------------------------------------------- bounded autotuning
def test_autotune_modes(monkeypatch):
    import triton

    from erm.kernels import autotune

    cfgs = [triton.Config({"B": b}, num_warps=w) for b in (1, 2) for w in (4, 8)]
    quick = [dict(B=2, num_warps=8), 0]
    assert autotune.select(cfgs, quick, "full") == cfgs
    assert autotune.select(cfgs, quick, "quick") == [cfgs[3], cfgs[0]]
    assert autotune.select(cfgs, quick, "pinned") == [cfgs[3]]
    assert autotune.select(cfgs, None, "pinned") == [cfgs[0]]
    with pytest.raises(ValueError, match="matches no config"):
        autotune.select(cfgs, [dict(B=3)], "quick")
    with pytest.raises(ValueError, match="not an index"):
        autotune.select(cfgs, [7], "quick")
    monkeypatch.setenv("ERM_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="ERM_AUTOTUNE"):
        autotune.mode()
    monkeypatch.setenv("ERM_AUTOTUNE", "Pinned")
    assert autotune.mode() == "pinned"
    monkeypatch.setenv("ERM_AUTOTUNE_BUDGET_S", "0")
    with pytest.raises(ValueError, match="ERM_AUTOTUNE_BUDGET_S"):
        autotune.budget_s()


def test_autotune_budget_stops_the_search(monkeypatch):
    import triton.testing

    from erm.kernels import autotune

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, **kw: (fn(), calls.append(kw))[0] or [1.0, 1.0, 1.0])
    ran = []
    budget = autotune._Budget(0.0)
    assert budget.start(["a", "b"], {}) == ["a", "b"]
    q = (0.5, 0.2, 0.8)
    assert budget.bench(lambda: ran.append(1), q) == [1.0, 1.0, 1.0]   # the first always runs
    assert budget.bench(lambda: ran.append(2), q) == [float("inf")] * 3  # past the budget
    assert ran == [1] and calls[0]["warmup"] == autotune.QUICK_WARMUP_MS
    budget.start([], {})                                                  # a new shape
    budget.seconds = 60.0
    budget.bench(lambda: ran.append(3), q)
    budget.bench(lambda: ran.append(4), q)
    assert ran == [1, 3, 4]


def test_kernel_shortlists_name_real_configs(monkeypatch):
    from erm.kernels import autotune
    from erm.kernels import linear_token_stats as lk
    from erm.kernels import token_stats as tk

    assert len(autotune.select(tk._FWD_CONFIGS, tk._FWD_QUICK, "quick")) == 3
    assert len(autotune.select(tk._BWD_CONFIGS, tk._BWD_QUICK, "quick")) == 3
    monkeypatch.setattr(lk, "INTERPRET", False)  # the GPU's config list
    gpu_cfgs = lk._configs()
    assert len(autotune.select(gpu_cfgs, lk._QUICK, "quick")) == len(lk._QUICK) < len(gpu_cfgs)


def test_a_run_with_stand_in_tools_returns_at_most_8_files(tmp_path):
    """The run path itself (logs, step table, tarball, what lands in OUT), with python3,
    nvidia-smi and compute-sanitizer replaced by scripts that log their arguments."""
    import os
    import tarfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "nvidia-smi": 'echo "NVIDIA H100 80GB HBM3"',
        "compute-sanitizer": 'echo "compute-sanitizer $*"',
        # a bench writes its --json / --plot files; everything else only logs its arguments
        "python3": 'echo "python3 $*"; while [ $# -gt 0 ]; do case "$1" in '
                   '--json|--plot) echo x > "$2"; shift;; -c) case "$2" in *capability*) '
                   'echo 9.0;; esac; shift;; esac; shift; done',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["gpu_session_essential.tgz", "token_stats-h100.json",
                            "token_stats-h100.png", "linear-h100.json", "linear-h100.png",
                            "score-h100.json"])
    with tarfile.open(out / "gpu_session_essential.tgz") as tar:
        names = {pathlib.PurePath(n).name for n in tar.getnames()}
    steps, _ = _plan()
    assert {f"{name}.log" for name, _, _ in steps} | {"steps.tsv"} <= names
    table = (tmp_path / "erm_gpu_session_essential" / "steps.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in table] == [name for name, _, _ in steps]
    assert all(row.split("\t")[2] == "0" for row in table), table
    build_log = (tmp_path / "erm_gpu_session_essential" / "build.log").read_text()
    assert "-m pip install --no-build-isolation --no-deps -e ." in build_log


def test_a_rerun_can_name_its_steps():
    import os

    proc = subprocess.run(["bash", str(SCRIPT), "--plan"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, ERM_GPU_STEPS="tests,score"))
    lines = [ln.split("\t") for ln in proc.stdout.strip().splitlines()]
    steps, _ = _plan()
    limits = {name: limit for name, limit, _ in steps}
    assert [ln[0] for ln in lines] == ["tests", "score", "total"]
    assert int(lines[-1][1]) == limits["tests"] + limits["score"]
