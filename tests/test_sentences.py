"""erm.sentences.split_sentences: cases and the span invariants (ordered, disjoint, trimmed,
covering every non-space character)."""
import random

import pytest

from erm.sentences import sentences, split_sentences


def check_spans(text, spans):
    prev = 0
    covered = set()
    for a, b in spans:
        assert prev <= a < b <= len(text), (text, spans)
        assert not text[a].isspace() and not text[b - 1].isspace(), (text, spans)
        covered.update(range(a, b))
        prev = b
    for i, c in enumerate(text):
        if not c.isspace():
            assert i in covered, (text, i, spans)


CASES = [
    ("Hello world. Second sentence! Third? Yes.",
     ["Hello world.", "Second sentence!", "Third?", "Yes."]),
    ("Dr. Smith went to Washington. He met Mr. Jones, e.g. at noon, i.e. lunch. Then he left.",
     ["Dr. Smith went to Washington.", "He met Mr. Jones, e.g. at noon, i.e. lunch.",
      "Then he left."]),
    ("The U.S. economy grew 3.14 percent. It was good.",
     ["The U.S. economy grew 3.14 percent.", "It was good."]),
    ("Pi is 3.14159. E is 2.718.", ["Pi is 3.14159.", "E is 2.718."]),
    ("Steps:\n1. Open the door.\n2. Walk in. Sit down.\n3. Relax",
     ["Steps:", "1. Open the door.", "2. Walk in.", "Sit down.", "3. Relax"]),
    ("- apples\n- pears\n\nDone.", ["- apples", "- pears", "Done."]),
    ("* one\n* two", ["* one", "* two"]),
    ("First paragraph\n\nSecond paragraph", ["First paragraph", "Second paragraph"]),
    ("Look:\n```python\nx = 1. \nprint(x)\n```\nThat is code. Nice.",
     ["Look:", "```python\nx = 1. \nprint(x)\n```", "That is code.", "Nice."]),
    ("Unclosed fence\n```\ncode here. More.\n", ["Unclosed fence", "```\ncode here. More."]),
    ("这是第一句。这是第二句！真的吗？是的", ["这是第一句。", "这是第二句！", "真的吗？", "是的"]),
    ("Wait... What happened? Well... it is fine.",
     ["Wait...", "What happened?", "Well... it is fine."]),
    ("Hmm…  Next one.", ["Hmm…", "Next one."]),
    ('He said "Stop." Then he left. (This is true.) OK.',
     ['He said "Stop."', "Then he left.", "(This is true.)", "OK."]),
    ("He said “Go.” She went.", ["He said “Go.”", "She went."]),
    ("apples, oranges, etc. And more.", ["apples, oranges, etc.", "And more."]),
    ("Version 2.0 is out. Visit example.com now.",
     ["Version 2.0 is out.", "Visit example.com now."]),
    ("J. R. R. Tolkien wrote books. Great ones.", ["J. R. R. Tolkien wrote books.", "Great ones."]),
    ("  leading space. Trailing space.   ", ["leading space.", "Trailing space."]),
    ("# Title\nSome text here. More text.\n## Sub\nText",
     ["# Title", "Some text here.", "More text.", "## Sub", "Text"]),
    ("No terminator at all", ["No terminator at all"]),
    ("Really?! Yes!!", ["Really?!", "Yes!!"]),
    ("The answer is 4.", ["The answer is 4."]),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_cases(text, expected):
    spans = split_sentences(text)
    check_spans(text, spans)
    assert [text[a:b] for a, b in spans] == expected
    assert sentences(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t"])
def test_empty(text):
    assert split_sentences(text) == []


def test_type_error():
    with pytest.raises(TypeError):
        split_sentences(None)


def test_offsets_are_characters_not_bytes():
    text = "Ünïcödé é. 🙂 Next."
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == ["Ünïcödé é.", "🙂 Next."]


def test_crlf_and_blank_lines():
    text = "One.\r\n\r\nTwo.\r\nThree"
    spans = split_sentences(text)
    check_spans(text, spans)
    assert [text[a:b] for a, b in spans] == ["One.", "Two.", "Three"] or \
        [text[a:b] for a, b in spans] == ["One.", "Two.\r\nThree"]


def test_random_invariants():
    rng = random.Random(0)
    pieces = ["Hello", "world", ".", "!", "?", " ", " ", "\n", "\n\n", "Dr.", "e.g.", "3.14",
              "1.", "- ", "```", "。", "…", "...", '"', ")", "U.S.", "a", "B", "\t", "中文", "#"]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        check_spans(text, split_sentences(text))
