"""normalize_text goldens and properties."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usmqs.data.text import normalize_text

GOLDENS = [
    ("Hello, World!", "hello world"),
    ("  Weather   in\tBoston\n tomorrow ", "weather in boston tomorrow"),
    ("Don't STOP", "don't stop"),
    ("Don\u2019t stop \u2018believing\u2019", "don't stop believing"),  # curly apostrophes
    ("\u201cquoted\u201d words", "quoted words"),
    ("'hello' said the dogs' owner", "hello said the dogs owner"),
    ("rock 'n' roll", "rock n roll"),
    ("o'clock", "o'clock"),
    ("twenty-five", "twenty five"),
    ("wait\u2014what\u2013now", "wait what now"),  # em and en dashes
    ("HE SAID: \"NO.\"", "he said no"),
    ("caf\u00e9 na\u00efve r\u00e9sum\u00e9", "cafe naive resume"),
    ("\uff21\uff22\uff23 \ufb01sh", "abc fish"),  # full-width letters, fi ligature
    ("Stra\u00dfe", "strasse"),
    ("call 911 now", "call 911 now"),  # digits kept
    ("3.5 million", "3 5 million"),
    ("e-mail me@example.com", "e mail me example com"),
    ("\u4f60\u597d hello \u03b1\u03b2\u03b3", "hello"),  # letters outside a-z dropped
    ("", ""),
    ("?!...", ""),
    ("can''t", "cant"),
    ("hy\u00adphen\u200bated", "hyphenated"),  # soft hyphen, zero-width space
    ("CHAPTER ONE THE BOY'S DOG", "chapter one the boy's dog"),
]


@pytest.mark.parametrize("raw, expected", GOLDENS)
def test_goldens(raw, expected):
    assert normalize_text(raw) == expected


@given(st.text())
def test_output_alphabet_and_idempotence(s):
    out = normalize_text(s)
    assert re.fullmatch(r"([a-z0-9']+( [a-z0-9']+)*)?", out)
    assert normalize_text(out) == out
    for word in out.split():
        assert not word.startswith("'") and not word.endswith("'")


@given(st.lists(st.from_regex(r"[a-z]+('[a-z]+)?", fullmatch=True), min_size=1, max_size=6))
def test_already_normal_text_is_unchanged(words):
    s = " ".join(words)
    assert normalize_text(s) == s
    assert normalize_text(s.upper()) == s
