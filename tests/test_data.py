"""The built-in preference sample erm/data/pairs.jsonl (used by `erm eval` without --data), and
the JSONL readers behind `--data`: gzip, other compression formats, encodings, line numbers."""
import bz2
import gzip
import json
import lzma
import re
from collections import Counter

import pytest

from erm.data import DataError, Pair, default_data_path, load_pairs, load_records

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


# ------------------------------------------------------------------------------------ reading
# (the readers behind `erm score --data` and `erm eval --data`)

def _recs_text(n=3):
    return "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}", "chosen": f"c{i}",
                               "rejected": f"x{i}"}, ensure_ascii=False) + "\n"
                   for i in range(n))


def test_gzip_is_read_transparently(tmp_path):
    """`.jsonl.gz` files are decompressed, also when only the magic bytes say gzip."""
    for name in ("data.jsonl.gz", "data.jsonl"):
        p = tmp_path / name
        p.write_bytes(gzip.compress(_recs_text().encode("utf-8")))
        recs = load_records(p)
        assert [r["response"] for r in recs] == ["r0", "r1", "r2"]
        assert [x.chosen for x in load_pairs(p)] == ["c0", "c1", "c2"]
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(gzip.compress(_recs_text().encode("utf-8"))[:-12])
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*gzip"):
        load_records(bad)


@pytest.mark.parametrize("fmt, data", [
    ("bz2", lambda b: bz2.compress(b)),
    ("xz", lambda b: lzma.compress(b)),
    ("zstd", lambda b: b"\x28\xb5\x2f\xfd" + b"\x00" * 16),
])
def test_other_compression_is_named(tmp_path, fmt, data):
    p = tmp_path / "data.jsonl"
    p.write_bytes(data(_recs_text().encode("utf-8")))
    for load in (load_records, load_pairs):
        with pytest.raises(DataError, match=re.escape(f"{p}: {fmt}-compressed")):
            load(p)


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(_recs_text(2).encode("utf-8") + '{"prompt": "café", "response": "r"}\n'
                  .encode("latin-1"))
    for load in (load_records, load_pairs):
        with pytest.raises(DataError, match=re.escape(f"{p}: line 3: not valid UTF-8")):
            load(p)
    gz = tmp_path / "latin1.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    with pytest.raises(DataError, match=re.escape(f"{gz}: line 3: not valid UTF-8")):
        load_records(gz)


def test_unicode_line_breaks_inside_strings(tmp_path):
    """Only "\\n" ends a record: U+2028 / U+0085 inside a JSON string (as ensure_ascii=False
    writes them) do not split it; a byte-order mark and CRLF line ends are accepted."""
    rec = {"prompt": "a\u2028b\x85c", "response": "d\u2029e", "chosen": "f", "rejected": "g"}
    p = tmp_path / "u.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (json.dumps(rec, ensure_ascii=False) + "\r\n").encode())
    assert load_records(p) == [rec]
    assert load_pairs(p)[0].prompt == rec["prompt"]


def test_records_with_lines_and_field(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"prompt": "p", "response": "r"}\n\n{"prompt": "p", "response": "r", '
                 '"reward": 1}\n', encoding="utf-8")
    assert load_records(p, with_lines=True) == [(1, {"prompt": "p", "response": "r"}),
                                                (3, {"prompt": "p", "response": "r",
                                                     "reward": 1})]
    with pytest.raises(DataError, match=re.escape(f"{p}: line 3: the record already has a "
                                                  "'reward' field")):
        load_records(p, field="reward")
    assert len(load_records(p, field="score")) == 2


def test_pairs_know_their_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n" + _recs_text(2), encoding="utf-8")
    pairs = load_pairs(p)
    assert [x.where for x in pairs] == [f"{p}: line 2", f"{p}: line 3"]
    assert pairs[0] == Pair("p0", "c0", "x0")  # `where` is not compared


BAD_LINES = [  # (line, what the error says)
    ('{"prompt": "p", "response": "r", "prompt": "q"}', "duplicate key 'prompt'"),
    ('{"prompt": "p", "response": "r", "meta": {"a": 1, "a": 2}}', "duplicate key 'a'"),
    ('{"prompt": "p", "response": "r", "score": NaN}', "NaN is not JSON"),
    ('{"prompt": "p", "response": "r", "score": -Infinity}', "-Infinity is not JSON"),
    ('{"prompt": "hi\\ud800 there", "response": "r"}', 'lone surrogate in the string "hi\\ud800'),
    ('{"prompt": "p", "response": "r", "\\udfff": 1}', "lone surrogate"),
    ('{"prompt": "p", "response": "r", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "nested too deeply"),
]


@pytest.mark.parametrize("line,why", BAD_LINES, ids=["dup", "dup-nested", "nan", "inf",
                                                      "surrogate", "surrogate-key", "deep"])
def test_strict_json_lines_name_file_and_line(tmp_path, line, why):
    ok = '{"prompt": "fine \\ud83d\\ude00", "response": "r", "s": 1.5}'  # a surrogate pair is fine
    path = tmp_path / "in.jsonl"
    path.write_text(ok + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_records(path)
    assert str(exc.value).startswith(f"{path}: line 3: ") and why in str(exc.value), exc.value
    str(exc.value).encode("utf-8")  # printable: no lone surrogate in the message itself
    pair = line.replace('"response": "r"', '"chosen": "a", "rejected": "b"')
    path.write_text(pair + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: line 1: "):
        load_pairs(path)
    path.write_text(ok + "\n", encoding="utf-8")
    assert load_records(path) == [{"prompt": "fine \U0001f600", "response": "r", "s": 1.5}]
