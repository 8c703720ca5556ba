"""JSON that erm writes for a user: strict JSON, never the `NaN` / `Infinity` literals.

    text = jsonio.dumps(report, "the report", indent=1)   # NonFiniteJSON names the key path

A non-finite float (a NaN score, an infinite loss) is an error naming what was being written and
where in it the value sits, raised before anything is written.
"""
import json
import math


class NonFiniteJSON(ValueError):
    """A value to be written as JSON holds a NaN or infinite float."""


def non_finite(obj):
    """(key path, value) of the first NaN or infinite float in a JSON-like value, or None.
    The path joins dict keys and list indices with dots ("methods.endorm_sum.accuracy")."""
    stack = [("", obj)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return path or "the value", v
        items = v.items() if isinstance(v, dict) else enumerate(v) \
            if isinstance(v, (list, tuple)) else ()
        stack.extend(reversed([(f"{path}.{k}" if path else str(k), x) for k, x in items]))
    return None


def dumps(obj, what: str, **kw) -> str:
    """`json.dumps(obj, allow_nan=False, **kw)`; a non-finite float raises NonFiniteJSON
    naming `what` and its key path (e.g. "the report: methods.endorm_sum.accuracy is nan")."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        found = non_finite(obj)
        if found is None:
            raise
        raise NonFiniteJSON(f"{what}: {found[0]} is {found[1]}, which JSON cannot hold (a "
                            "non-finite score or loss); nothing is written") from None
