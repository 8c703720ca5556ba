"""`triton.autotune` that can be declared on a machine without a GPU driver, with a bounded search.

Triton before 3.3 builds its benchmarker when the decorator runs
(`driver.active.get_benchmarker()`), which raises "0 active drivers" on a CPU-only machine, so importing a kernel module failed under
the interpreter and in ahead-of-time compiles (and 3.2 drops a `do_bench=` argument). Giving it
explicit warm-up and repetition times takes its other branch, which builds the same
`triton.testing.do_bench` (25 ms warm-up, 100 ms of repetitions: Triton's defaults) without
touching the driver. Newer Tritons get the decorator untouched.

Under TRITON_INTERPRET=1 with a single config (how the CPU tests run) there is nothing to tune:
the kernel is launched with that config's meta-parameters directly (Triton 3.2's interpreter
passes the autotuner's internal launch options on to the kernel function and fails).

How much the first call at a new shape may search is set by the environment variable
`ERM_AUTOTUNE`, read when a kernel module is imported:

* `full` (default): every config, Triton's default benchmark (25 ms warm-up, 100 ms of runs each);
* `quick`: only the configs the kernel lists as its shortlist (`quick=` indices, best guesses
  first), 5 ms warm-up and 20 ms of runs each, and the search stops after `ERM_AUTOTUNE_BUDGET_S`
  seconds (default 20) for one shape: the configs not reached by then are not compiled or run
  (the first one always is). The budget needs Triton >= 3.3 (`do_bench=`); older Tritons get the
  shortlist and the short benchmark only;
* `pinned`: the first shortlisted config only — no search, no benchmark (the GPU tests and
  compute-sanitizer runs, where speed is not measured).
"""
import os
import time
import warnings

import triton

_OLD = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3)
MODES = ("full", "quick", "pinned")
QUICK_WARMUP_MS, QUICK_REP_MS = 5, 20


class _Fixed:
    """`kernel[grid](...)` with one config's meta-parameters filled in."""

    def __init__(self, fn, config):
        self.fn = fn
        self.meta = dict(config.kwargs)

    def __getitem__(self, grid):
        return lambda *args, **kw: self.fn[grid](*args, **self.meta, **kw)


def mode() -> str:
    """The search mode from ERM_AUTOTUNE ("full" when unset); ValueError naming the variable
    for any other value than "full", "quick" or "pinned"."""
    m = os.environ.get("ERM_AUTOTUNE", "full").strip().lower() or "full"
    if m not in MODES:
        raise ValueError(f"ERM_AUTOTUNE must be one of {', '.join(MODES)}, got {m!r}")
    return m


def budget_s() -> float:
    """The per-shape search budget of the quick mode in seconds (ERM_AUTOTUNE_BUDGET_S, > 0)."""
    raw = os.environ.get("ERM_AUTOTUNE_BUDGET_S", "20")
    try:
        b = float(raw)
    except ValueError:
        b = -1.0
    if not b > 0:
        raise ValueError(f"ERM_AUTOTUNE_BUDGET_S must be a positive number of seconds, got {raw!r}")
    return b


def _matches(config, want):
    have = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return all(have.get(k) == v for k, v in want.items())


def select(configs, quick, which=None):
    """The configs searched in mode `which` (default: `mode()`): all of them ("full"), the
    shortlist `quick` ("quick"; all when `quick` is None), or the first of the shortlist
    ("pinned"). Each `quick` entry is an index into `configs` or a dict of meta-parameters
    (with `num_warps` / `num_stages`) that picks the first config having those values."""
    which = which or mode()
    if which == "full":
        return list(configs)
    if quick is None:
        chosen = list(configs)
    else:
        chosen = []
        for q in quick:
            if isinstance(q, dict):
                hit = [c for c in configs if _matches(c, q)]
                if not hit:
                    raise ValueError(f"autotune shortlist entry {q} matches no config")
                chosen.append(hit[0])
            elif isinstance(q, int) and -len(configs) <= q < len(configs):
                chosen.append(configs[q])
            else:
                raise ValueError(f"autotune shortlist entry {q!r} is not an index into "
                                 f"{len(configs)} configs")
    if not chosen:
        raise ValueError("the quick shortlist of an autotuned kernel is empty")
    return chosen[:1] if which == "pinned" else chosen


class _Budget:
    """Round-scoped deadline: `start` is called by Triton's early pruning once per new key, before
    the configs are benchmarked; `bench` measures a config while the round is within budget and
    reports +inf (not compiled, not run) for the ones after it, always measuring the first."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.t0 = None
        self.measured = 0

    def start(self, configs, nargs, **kwargs):
        self.t0, self.measured = time.monotonic(), 0
        return configs

    def bench(self, kernel_call, quantiles):
        over = self.t0 is not None and time.monotonic() - self.t0 > self.seconds
        if over and self.measured > 0:
            return [float("inf")] * len(quantiles) if quantiles else float("inf")
        self.measured += 1
        import triton.testing

        return triton.testing.do_bench(kernel_call, warmup=QUICK_WARMUP_MS, rep=QUICK_REP_MS,
                                       quantiles=quantiles)


def autotune(configs, key, *, quick=None, **kwargs):
    """`triton.autotune(configs, key, **kwargs)`, GPU-free at declaration time, searching the
    configs that ERM_AUTOTUNE selects (`quick`: the shortlist, best guess first, as indices into
    `configs` or dicts of meta-parameters; see `select` and the module docstring)."""
    if len(configs) == 1 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return lambda fn: _Fixed(fn, configs[0])
    which = mode()
    configs = select(configs, quick, which)
    if which == "quick" and len(configs) > 1:
        if _OLD:
            kwargs.setdefault("warmup", QUICK_WARMUP_MS)
            kwargs.setdefault("rep", QUICK_REP_MS)
        else:
            budget = _Budget(budget_s())
            kwargs.setdefault("do_bench", budget.bench)
            kwargs.setdefault("prune_configs_by", {"early_config_prune": budget.start})
    if not _OLD:
        return triton.autotune(configs=configs, key=key, **kwargs)
    kwargs.setdefault("warmup", 25)
    kwargs.setdefault("rep", 100)
    inner = triton.autotune(configs=configs, key=key, **kwargs)

    def decorator(fn):
        with warnings.catch_warnings():  # "warmup and rep are deprecated" (the point here)
            warnings.simplefilter("ignore", DeprecationWarning)
            return inner(fn)

    return decorator
