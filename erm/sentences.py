"""Rule-based sentence splitting for LM responses (prose, lists, code, CJK), no dependencies.

`split_sentences(text)` returns character spans (start, end), end exclusive, that are ordered,
non-overlapping, trimmed of surrounding whitespace, and together cover every non-whitespace
character of `text`. The whitespace between sentences belongs to no span.

Rules, in order:
  1. Fenced code blocks (``` or ~~~ up to the closing fence, or to the end of the text) are one
     unit each.
  2. Outside code, blank lines end a unit; so does a newline before a list item ("- ", "* ",
     "+ ", "• ", "1. ", "2) ", "a) "), a heading ("# "), a table row ("|"), a block quote (">"),
     and a newline after a line that was one of those.
  3. Inside a unit, a sentence ends after `.`, `!`, `?`, `…` or `...` (plus closing quotes or
     brackets) followed by whitespace — for `.` only when the next word does not start with a
     lowercase letter and the word before is not an abbreviation (Dr., e.g., i.e., U.S., etc.)
     or a single initial, and not a decimal point (3.14 has no space anyway); CJK terminators
     (。！？) end a sentence with or without a following space.
"""
import re
from typing import List, Tuple

Span = Tuple[int, int]

# lower-cased words (without the final period) that do not end a sentence before a capital
_ABBREV = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "v", "cf", "fig",
    "figs", "eq", "eqs", "no", "nos", "vol", "vols", "pp", "p", "ch", "sec", "al", "approx",
    "dept", "est", "inc", "ltd", "co", "corp", "gen", "gov", "sen", "rep", "rev", "sgt", "capt",
    "col", "lt", "cmdr", "adm", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec", "mon", "tue", "wed", "thu", "fri", "sat", "sun", "e.g", "i.e", "a.m",
    "p.m", "u.s", "u.k", "u.s.a", "u.n", "e.u", "ph.d", "m.d", "b.a", "m.a", "b.sc", "m.sc",
    "viz", "resp", "ca", "op", "ed", "eds", "min", "max", "misc",
}
# abbreviations that may end a sentence when a capitalised word follows
_SOFT_ABBREV = {"etc", "al", "inc", "ltd", "co", "corp"}

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
_ITEM = re.compile(r"^[ \t]*(?:[-*+•·▪‣◦]|\d{1,3}[.)]|[a-zA-Z][.)]|#{1,6}|>|\|)[ \t]")
_ITEM_MARKER = re.compile(r"[ \t]*(?:[-*+•·▪‣◦]|\d{1,3}[.)]|[a-zA-Z][.)]|#{1,6}|>)[ \t]+")
_TABLE = re.compile(r"^[ \t]*\|")
_CJK_END = "。！？!?｡"
_CLOSERS = "\"'”’»)]}）」』】〕》〉"
_OPENERS = "\"'“‘«([{（「『【〔《〈¿¡"
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")


def _blocks(text: str) -> List[Tuple[int, int, bool]]:
    """Units (start, end, is_code) of the text, split on fences, blank lines and list lines."""
    out: List[Tuple[int, int, bool]] = []
    lines = text.splitlines(keepends=True)
    pos, i = 0, 0
    cur_start = None      # start of the current prose unit
    prev_item = False     # the previous line was a list item / heading / table row

    def flush(end):
        nonlocal cur_start
        if cur_start is not None:
            out.append((cur_start, end, False))
            cur_start = None

    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if m:
            flush(pos)
            fence = m.group(1)
            start, j, end = pos, i + 1, pos + len(line)
            while j < len(lines):
                end += len(lines[j])
                if lines[j].strip().startswith(fence[0] * len(fence)) and \
                        lines[j].strip().strip(fence[0]) == "":
                    j += 1
                    break
                j += 1
            out.append((start, end, True))
            pos, i, prev_item = end, j, False
            continue
        if not line.strip():
            flush(pos)
            prev_item = False
        else:
            is_item = bool(_ITEM.match(line)) or bool(_TABLE.match(line))
            if is_item or prev_item:
                flush(pos)
            if cur_start is None:
                cur_start = pos
            prev_item = is_item
        pos += len(line)
        i += 1
    flush(pos)
    return out


def _next_nonspace(text: str, k: int, end: int) -> int:
    while k < end and text[k].isspace():
        k += 1
    return k


def _is_abbrev(text: str, dot: int, start: int, nxt_char: str) -> bool:
    """Whether the '.' at text[dot] ends an abbreviation or an initial rather than a sentence."""
    m = _WORD_BEFORE.search(text, start, dot)
    if not m:
        return False
    word = m.group(1).lower()
    if word in _SOFT_ABBREV:
        return not nxt_char.isupper()
    if word in _ABBREV:
        return True
    if len(word) == 1 and m.group(1).isupper():  # an initial: "J. Smith"
        return True
    # dotted acronyms such as "U.S.A" / "e.g" not in the list
    return bool(re.fullmatch(r"(?:[a-z]\.)+[a-z]", word))


def _split_prose(text: str, start: int, end: int) -> List[Span]:
    spans: List[Span] = []
    # skip a list marker at the start of the unit ("1. ", "- "): it never ends a sentence
    s = _next_nonspace(text, start, end)
    m = _ITEM_MARKER.match(text, s, end)
    k = m.end() if m else s
    sent_start = s
    while k < end:
        c = text[k]
        term = None
        if c in _CJK_END and c not in "!?":  # CJK: ends with or without a space
            j = k + 1
            while j < end and text[j] in _CJK_END:
                j += 1
            while j < end and text[j] in _CLOSERS:
                j += 1
            term = j
        elif c in ".!?…":
            j = k
            while j < end and text[j] in ".!?…":
                j += 1
            while j < end and text[j] in _CLOSERS:
                j += 1
            run = text[k:j]
            nxt = _next_nonspace(text, j, end)
            if j < end and not text[j].isspace() and text[j] not in _OPENERS:
                term = None  # "3.14", "e.g.x", "file.py", "a.b"
                if c in "!?" and j < end and (text[j].isupper() or ord(text[j]) > 0x2e7f):
                    term = j  # "Yes!No" / "吗?你"
            elif nxt >= end:
                term = j
            else:
                nc = text[nxt]
                if nc in _OPENERS and nxt + 1 < end:
                    nc = text[nxt + 1]
                dots_only = set(run.rstrip(_CLOSERS)) <= {"."}
                if "!" in run or "?" in run:
                    term = j
                elif dots_only and len(run.rstrip(_CLOSERS)) == 1:
                    if nc.islower() or _is_abbrev(text, k, sent_start, nc):
                        term = None
                    else:
                        term = j
                else:  # ellipsis: a sentence end only before a capital / non-letter
                    term = None if nc.islower() else j
            if term is None:
                k = j
                continue
        if term is not None:
            spans.append((sent_start, term))
            k = _next_nonspace(text, term, end)
            sent_start = k
            continue
        k += 1
    if sent_start < end:
        e = end
        while e > sent_start and text[e - 1].isspace():
            e -= 1
        if e > sent_start:
            spans.append((sent_start, e))
    return spans


def split_sentences(text: str) -> List[Span]:
    """Split `text` into sentences.

    Args:
        text: any string (prose, markdown lists, code fences, CJK).
    Returns:
        list of (start, end) character offsets (end exclusive), ordered and non-overlapping,
        each trimmed of leading/trailing whitespace; every non-whitespace character lies in
        exactly one span. [] for an empty or all-whitespace text.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    spans: List[Span] = []
    for a, b, code in _blocks(text):
        if code:
            a = _next_nonspace(text, a, b)
            while b > a and text[b - 1].isspace():
                b -= 1
            if b > a:
                spans.append((a, b))
        else:
            spans.extend(_split_prose(text, a, b))
    return spans


def sentences(text: str) -> List[str]:
    """The sentences of `text` as strings (see `split_sentences`)."""
    return [text[a:b] for a, b in split_sentences(text)]
