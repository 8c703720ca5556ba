"""The built-in preference sample erm/data/pairs.jsonl (used by `erm eval` without --data)."""
import json
import re
from collections import Counter

import pytest

from erm.evaluate import default_data_path, load_pairs

SUBSETS = {"factuality", "arithmetic", "safety", "instruction_following"}


@pytest.fixture(scope="module")
def raw():
    text = default_data_path().read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_loads_and_counts(raw):
    pairs = load_pairs(default_data_path())
    assert len(pairs) == len(raw) >= 64
    counts = Counter(p.subset for p in pairs)
    assert set(counts) == SUBSETS
    assert all(n >= 16 for n in counts.values()), counts


def test_schema(raw):
    for i, rec in enumerate(raw, 1):
        assert set(rec) == {"prompt", "chosen", "rejected", "subset"}, i
        for key in ("prompt", "chosen", "rejected"):
            assert isinstance(rec[key], str) and rec[key].strip() == rec[key] and rec[key], (i, key)


def test_no_duplicates(raw):
    assert len({r["prompt"] for r in raw}) == len(raw)
    responses = [r["chosen"] for r in raw] + [r["rejected"] for r in raw]
    assert len(set(responses)) == len(responses)
    for r in raw:
        assert r["chosen"] != r["rejected"]


def test_short(raw):
    """Short responses keep `erm eval` on the 135M default model fast on a CPU."""
    for r in raw:
        assert len(r["prompt"]) <= 160
        for key in ("chosen", "rejected"):
            assert len(r[key]) <= 160, r[key]
            assert len(re.findall(r"[.!?](\s|$)", r[key])) <= 3, r[key]


def test_subsets_interleaved(raw):
    """`--limit N` on the sample takes a mix of subsets, not one subset."""
    assert len({r["subset"] for r in raw[:8]}) == len(SUBSETS)


def test_length_is_no_shortcut(raw):
    """Within every subset the longer response wins about half the time, so the `length`
    baseline of `erm eval` sits near chance and accuracy reflects content."""
    by = {}
    for r in raw:
        c, j = len(r["chosen"]), len(r["rejected"])
        by.setdefault(r["subset"], []).append(1.0 if c > j else 0.5 if c == j else 0.0)
    for subset, outcomes in by.items():
        assert 0.4 <= sum(outcomes) / len(outcomes) <= 0.6, subset
