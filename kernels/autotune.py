"""`triton.autotune` that can be declared on a machine without a GPU driver.

Triton before 3.3 builds its benchmarker when the decorator runs (`driver.active.get_benchmarker()`),
which raises "0 active drivers" on a CPU-only machine, so importing a kernel module failed under
the interpreter and in ahead-of-time compiles (and 3.2 drops a `do_bench=` argument). Giving it
explicit warm-up and repetition times takes its other branch, which builds the same
`triton.testing.do_bench` (25 ms warm-up, 100 ms of repetitions: Triton's defaults) without
touching the driver. Newer Tritons get the decorator untouched.

Under TRITON_INTERPRET=1 with a single config (how the CPU tests run) there is nothing to tune:
the kernel is launched with that config's meta-parameters directly (Triton 3.2's interpreter
passes the autotuner's internal launch options on to the kernel function and fails).
"""
import os
import warnings

import triton

_OLD = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3)


class _Fixed:
    """`kernel[grid](...)` with one config's meta-parameters filled in."""

    def __init__(self, fn, config):
        self.fn = fn
        self.meta = dict(config.kwargs)

    def __getitem__(self, grid):
        return lambda *args, **kw: self.fn[grid](*args, **self.meta, **kw)


def autotune(configs, key, **kwargs):
    """`triton.autotune(configs, key, **kwargs)`, GPU-free at declaration time."""
    if len(configs) == 1 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return lambda fn: _Fixed(fn, configs[0])
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
