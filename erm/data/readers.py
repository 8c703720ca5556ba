"""Reading preference pairs and scoring records: JSONL (plain or gzip), Parquet, chat message
lists and HH-RLHF transcripts.

    pairs = erm.data.load_pairs("pairs.jsonl")          # [Pair(prompt, chosen, rejected, subset)]
    records = erm.data.load_records("responses.jsonl")  # [{"prompt", "response", ...}]
    for where, rec in erm.data.read_records("rb.parquet"): ...

The built-in sample of pairs is ``erm/data/pairs.jsonl`` (`default_data_path`). Every error about
the contents of a file is a `DataError` naming the file and the line (or row).
"""
import dataclasses
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .. import lm

Messages = List[Dict[str, str]]
Prompt = Union[str, Messages]

DEFAULT_SUBSET = "default"


class DataError(ValueError):
    """Malformed input data; the message names the file and the line."""


@dataclass(frozen=True)
class Pair:
    """One preference pair. `prompt` is a string (one user turn) or a chat message list."""

    prompt: Prompt
    chosen: str
    rejected: str
    subset: str = DEFAULT_SUBSET
    #: where the pair was read ("pairs.jsonl: line 3"; "" when unknown); not compared
    where: str = dataclasses.field(default="", compare=False, repr=False)


def default_data_path():
    """The built-in sample of preference pairs (a `Traversable`, usable as a path by `open`)."""
    return resources.files("erm").joinpath("data", "pairs.jsonl")


# ------------------------------------------------------------------------------------ records
def _messages(value, what: str) -> Messages:
    """Validate a chat message list and return a clean copy (role/content only)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of messages")
    try:
        return lm.messages(value)
    except (TypeError, ValueError) as exc:  # data errors are ValueErrors naming the field
        raise ValueError(f"{what}: {exc}") from None


def _prompt(value, what: str = "'prompt'") -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{what} is empty")
        return value
    if isinstance(value, list):
        return _messages(value, what)
    raise ValueError(f"{what} must be a string or a list of messages, got {type(value).__name__}")


def _response(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} response is empty")
    return value


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_LAST = "\n\nAssistant:"


def _split_hh(text: str, what: str):
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> (the text before the last assistant turn,
    the response)."""
    k = text.rfind(_HH_LAST)
    if k < 0:
        raise ValueError(f"{what} has no '\\n\\nAssistant:' turn (there is no 'prompt' key, "
                         "so an HH-RLHF transcript was expected)")
    return text[:k], _response(text[k + len(_HH_LAST):].strip(), what)


def _hh_messages(prefix: str) -> Messages:
    parts = _HH_TURN.split(prefix)
    if parts[0].strip():
        raise ValueError("transcript must start with 'Human:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    msgs = [{"role": roles[parts[i]], "content": parts[i + 1].strip()}
            for i in range(1, len(parts), 2)]
    if not msgs:
        raise ValueError("transcript has no 'Human:' turn before the last 'Assistant:'")
    return msgs


def parse_record(rec) -> Pair:
    """One preference record (a JSON object in a format `load_pairs` reads) as a `Pair`
    (`where` empty).

    Raises:
        ValueError: a malformed record (the message names what is wrong, not where).
    """
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise ValueError(f"missing key '{key}'")
    subset = rec.get("subset", DEFAULT_SUBSET)
    if subset is None:
        subset = DEFAULT_SUBSET
    if not isinstance(subset, str) or not subset:
        raise ValueError("'subset' must be a non-empty string")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
        raise ValueError("'chosen' and 'rejected' must both be strings or both be message lists")

    if isinstance(chosen, list):  # RewardBench / TRL conversational format
        c, r = _messages(chosen, "'chosen'"), _messages(rejected, "'rejected'")
        for name, msgs in (("chosen", c), ("rejected", r)):
            if msgs[-1]["role"] != "assistant":
                raise ValueError(f"'{name}' must end with an assistant message")
        if c[:-1] != r[:-1]:
            raise ValueError("'chosen' and 'rejected' do not share the same messages before the "
                             "final assistant turn")
        prefix = c[:-1]
        if "prompt" in rec:
            p = _prompt(rec["prompt"])
            p_msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
            if not prefix:
                prompt = p
            elif prefix[:len(p_msgs)] == p_msgs:  # the completions repeat the prompt
                prompt = prefix
            else:
                prompt = p_msgs + prefix
        elif prefix:
            prompt = prefix
        else:
            raise ValueError("no 'prompt' and no shared messages before the assistant turn")
        return Pair(prompt, _response(c[-1]["content"], "'chosen'"),
                    _response(r[-1]["content"], "'rejected'"), subset)

    if "prompt" in rec:  # {prompt, chosen, rejected}
        return Pair(_prompt(rec["prompt"]), _response(chosen, "'chosen'"),
                    _response(rejected, "'rejected'"), subset)

    # HH-RLHF: two full transcripts sharing everything up to the last "\n\nAssistant:"
    pc, c = _split_hh(chosen, "'chosen'")
    pr, r = _split_hh(rejected, "'rejected'")
    if pc != pr:
        raise ValueError("'chosen' and 'rejected' transcripts differ before the last "
                         "'\\n\\nAssistant:' turn")
    return Pair(_hh_messages(pc), c, r, subset)


def record_prompt(value) -> Prompt:
    """A scoring record's ``prompt`` (RM-Bench, best-of-N files) checked: a non-empty string as
    it is, or a chat message list as `erm.lm.messages` cleans it (role/content strings only).

    Raises:
        ValueError: anything else, naming 'prompt' (not where the record is).
    """
    if isinstance(value, list):
        try:
            return lm.messages(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'prompt': {exc}") from None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("'prompt' must be a non-empty string or a message list")
    return value


def parse_records(records: Iterable[Tuple[str, object]], parse: Callable[[object, str], object],
                  source: str) -> list:
    """``[parse(record, where)]`` over the (where, record) pairs of `read_records` (or any
    iterable of them), in order; `parse` raises a ValueError saying what is wrong with a record.

    Raises:
        DataError: "WHERE: what is wrong" for the first record `parse` refuses, or
            "SOURCE: no records found" when there are none.
    """
    items = []
    for where, rec in records:
        try:
            items.append(parse(rec, where))
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
    if not items:
        raise DataError(f"{source}: no records found")
    return items


#: Leading bytes of compressed formats -> their name (gzip is read; the others are refused).
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"),
          (b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"))


def _compression(data: bytes):
    """The compressed format `data` starts with (by its magic bytes), or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def _read_bytes(path) -> bytes:
    """The bytes of a file (str / PathLike / importlib Traversable); FileNotFoundError if none."""
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{path}: " + ("not a regular file" if p.exists()
                                                   else "no such file"))
        return p.read_bytes()
    return path.read_bytes()


def _decode_utf8(data: bytes, source: str) -> str:
    """UTF-8 text (a leading byte-order mark dropped); DataError naming the line of a bad byte."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{source}: line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} "
                        f"at column {col}); the file must be UTF-8 text") from None


def read_lines(path) -> List[str]:
    """Lines of a UTF-8 text file given as a str / PathLike / importlib Traversable; gzip files
    (recognised by their magic bytes, whatever the name) are decompressed on the fly.

    Lines are split at "\\n" only (a JSON string may hold U+2028 and other Unicode line breaks).

    Raises:
        FileNotFoundError: no such file.
        DataError: another compressed format (bz2, xz, zstd, zip), corrupt gzip data, or bytes
            that are not UTF-8 (naming the line).
    """
    source = str(path)
    data = _read_bytes(path)
    kind = _compression(data)
    if kind == "gzip":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{source}: corrupt or truncated gzip data ({exc})") from None
        kind = _compression(data)
        if kind is not None:
            raise DataError(f"{source}: gzip-compressed {kind} data; decompress it first")
    elif kind is not None:
        raise DataError(f"{source}: {kind}-compressed file; erm reads plain or gzip-compressed "
                        f"(.gz) JSONL: decompress it first")
    text = _decode_utf8(data, source)
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def load_pairs(path_or_list) -> List[Pair]:
    """Read preference pairs from a JSONL file, or validate a list of dicts.

    Accepted record formats (one JSON object per line; blank lines are skipped):

    - ``{"prompt", "chosen", "rejected", "subset"?}``: `prompt` a string (one user turn) or a chat
      message list ``[{"role", "content"}, ...]``; `chosen` / `rejected` response strings.
    - RewardBench / TRL conversational: `chosen` / `rejected` message lists ending with the
      assistant turn (the response); the prompt is `prompt` when given, else the messages they
      share before that turn.
    - HH-RLHF: ``{"chosen", "rejected"}`` full transcripts
      ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` sharing everything up to the last
      ``"\\n\\nAssistant:"``; split into a message-list prompt and the final assistant response.

    `subset` defaults to ``"default"``; other keys are ignored.

    Args:
        path_or_list: a path (str / PathLike / importlib Traversable; gzip-compressed files
            are read too) or a list of dicts.
    Returns:
        list of `Pair`, each with `where` set to its file and line ("pairs.jsonl: line 3").
    Raises:
        FileNotFoundError: the file does not exist.
        DataError (a ValueError): a malformed line — bad JSON, missing keys, wrong types, empty
            responses — naming the file and the 1-based line number (item number for a list),
            or no pairs at all.
    """
    if isinstance(path_or_list, (list, tuple)):
        source, items = "<list>", [(i + 1, rec) for i, rec in enumerate(path_or_list)]
        where = "item"
    else:
        source, items, where = str(path_or_list), json_lines(path_or_list), "line"
    pairs = []
    for lineno, rec in items:
        try:
            pair = parse_record(rec)
        except DataError:
            raise
        except ValueError as exc:
            raise DataError(f"{source}: {where} {lineno}: {exc}") from None
        pairs.append(dataclasses.replace(pair, where=f"{source}: {where} {lineno}"))
    if not pairs:
        raise DataError(f"{source}: no preference pairs found")
    return pairs


class _BadJSON(ValueError):
    """A JSON line that parses but is not one erm accepts (the message says why)."""


def _unique_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _BadJSON(f"duplicate key {k!r} in an object (which value is meant?)")
        obj[k] = v
    return obj


def _no_constant(name):
    raise _BadJSON(f"{name} is not JSON (write a number or null)")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value) -> Optional[str]:
    """The first string (key or value) in a parsed JSON value that holds a lone UTF-16
    surrogate (an unpaired \\ud800-\\udfff escape), or None; iterative, any depth."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return v
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def parse_json_line(line: str):
    """One JSON value from a line of input, stricter than `json.loads`: an object with a key
    given twice, the non-JSON constants NaN / Infinity / -Infinity, and a string with a lone
    UTF-16 surrogate escape ("\\ud800", not Unicode text) are refused.

    Raises:
        ValueError: what is wrong (json.JSONDecodeError for bad syntax; a RecursionError for
            nesting too deep for the parser is raised as a ValueError too).
    """
    try:
        value = json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    if _SURROGATE_ESCAPE.search(line):
        bad = _lone_surrogate(value)
        if bad is not None:
            shown = "".join(f"\\u{ord(c):04x}" if _SURROGATE.match(c) else c for c in bad[:40])
            raise ValueError(f'a lone surrogate in the string "{shown}"{"..." * (len(bad) > 40)}'
                             ": not valid Unicode text (a \\ud800-\\udfff escape without its "
                             "pair)")
    return value


def json_lines(path):
    """Yield (1-based line number, parsed JSON value) for every non-blank line of a JSONL file
    (plain or gzip, as `read_lines` reads it; each line as `parse_json_line` reads it), in
    order, so the first bad line, whatever is wrong with it, is the one reported.

    Raises:
        FileNotFoundError: no such file.
        DataError: invalid JSON on a line, a key given twice, NaN or Infinity, a lone surrogate
            or nesting too deep (naming the file and line), or what `read_lines` raises.
    """
    source = str(path)
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            value = parse_json_line(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: line {lineno}: invalid JSON ({exc.msg})") from None
        except ValueError as exc:
            raise DataError(f"{source}: line {lineno}: {exc}") from None
        yield lineno, value


def check_record(rec, field: Optional[str] = None) -> None:
    """Check one `erm score` record: an object with a `prompt` (string or message list) and a
    non-empty string `response`, without the key `field` when given.

    Raises:
        ValueError: what is wrong with the record (not where).
    """
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "response"):
        if key not in rec:
            raise ValueError(f"missing key '{key}'")
    _prompt(rec["prompt"])
    if not isinstance(rec["response"], str):
        raise ValueError("'response' must be a string")
    _response(rec["response"], "'response'")
    if field is not None and field in rec:
        raise ValueError(f"the record already has a '{field}' field (write the score to "
                         "another field with --field NAME, or replace it with "
                         "--overwrite-field)")


def load_records(path, *, field: Optional[str] = None, with_lines: bool = False) -> list:
    """Read a JSONL file of objects for `erm score`: each needs a `prompt` (string or message
    list) and a non-empty string `response`; other keys are kept as they are. Plain or
    gzip-compressed UTF-8.

    Args:
        path: str / PathLike / importlib Traversable.
        field: when given, a record that already has this key is an error (the key `erm score`
            is about to write).
        with_lines: return (1-based line number, record) tuples instead of records.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a malformed line or a record that already has `field` (naming the file and
            line), another compression format, or an empty file.
    """
    source, items = str(path), []
    for lineno, rec in json_lines(path):
        try:
            check_record(rec, field)
        except ValueError as exc:
            raise DataError(f"{source}: line {lineno}: {exc}") from None
        items.append((lineno, rec))
    if not items:
        raise DataError(f"{source}: no records found")
    return items if with_lines else [rec for _, rec in items]


# ------------------------------------------------------------------------------------ parquet
def is_parquet(path) -> bool:
    """Whether `path` names a Parquet file: a .parquet / .pq suffix, or the PAR1 magic bytes."""
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _parquet_rows(path, limit: Optional[int]) -> list:
    """The rows (dicts) of a local Parquet file, the first `limit` of them when given."""
    source = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        from datasets import Dataset
        rows = Dataset.from_parquet(str(path))
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        rows = rows.to_list()
    except ImportError:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{source}: reading Parquet needs the `datasets` (or `pyarrow`) "
                            "package: pip install datasets") from None
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as exc:  # a corrupt file
        raise DataError(f"{source}: cannot read Parquet: {exc}") from None
    return rows[:limit] if limit is not None else rows


def read_records(path, limit: Optional[int] = None) -> Iterator[Tuple[str, object]]:
    """Yield (where, record) for the records of a JSONL file (plain or gzip; one JSON value a
    non-blank line, where = "FILE: line N") or a local Parquet file (one dict a row, where =
    "FILE: row N"), in order; at most `limit` of them when given.

    Raises:
        FileNotFoundError: no such file.
        DataError: invalid JSON, bytes that are not UTF-8, an unsupported compression, a corrupt
            Parquet file or no Parquet reader installed.
    """
    source = str(path)
    if is_parquet(path):
        for i, rec in enumerate(_parquet_rows(path, limit)):
            yield f"{source}: row {i + 1}", rec
        return
    for k, (lineno, rec) in enumerate(json_lines(path)):
        if limit is not None and k >= limit:
            return
        yield f"{source}: line {lineno}", rec
