"""The one text normalization: tokenizer training, CTC labels and WER scoring all use it.

Scoring a hypothesis against a reference normalized differently inflates WER with
spurious "errors" (``Don't`` vs ``don't``), so every stage calls :func:`normalize_text`
and nothing else.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_text"]

# Typographic variants mapped before anything else so that NFKC and the character filter
# below see plain ASCII apostrophes and word-separating spaces.
_APOSTROPHES = "\u2018\u2019\u201b\u02bc\u2032\u0060\u00b4"  # ‘ ’ ‛ ʼ ′ ` ´
_DOUBLE_QUOTES = "\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033"  # “ ” „ ‟ « » ″
_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212-"  # ‐ ‑ ‒ – — ― − -
_INVISIBLE = "\u00ad\u200b\u200c\u200d\u2060\ufeff"  # soft hyphen, zero-width chars
_TRANSLATE = str.maketrans(
    {
        **{c: "'" for c in _APOSTROPHES},
        **{c: " " for c in _DOUBLE_QUOTES + _DASHES},
        **{c: "" for c in _INVISIBLE},  # they sit inside words: "hy\u00adphen" is one word
    }
)

_NOT_KEPT = re.compile(r"[^a-z0-9' ]+")
# An apostrophe survives only between two word characters ("don't", "o'clock");
# quoting apostrophes ('hello') and trailing possessives (dogs') are dropped.
_LONE_APOSTROPHE = re.compile(r"(?<![a-z0-9])'|'(?![a-z0-9])")
_SPACES = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    """Normalizes a transcript to lowercase words over ``[a-z0-9']``.

    Steps, in order:
      1. curly quotes, primes and backticks -> ``'``; double quotes and dashes
         (hyphens included: ``twenty-five`` -> ``twenty five``) -> space;
      2. unicode NFKC (full-width letters, ligatures: ``ﬁ`` -> ``fi``), then
         ``casefold`` (lowercase; ``ß`` -> ``ss``);
      3. accents removed (``café`` -> ``cafe``): NFKD, combining marks dropped;
      4. every character other than ``a-z``, ``0-9``, ``'`` becomes a space, so
         punctuation separates words (``hello,world`` -> ``hello world``) and letters
         outside ``a-z`` (Greek, CJK, ...) are removed;
      5. apostrophes not inside a word are deleted;
      6. whitespace collapsed and stripped.

    Digits are kept as they are (the embedded corpus spells numbers out; LibriSpeech has
    none). The function is idempotent: ``normalize_text(normalize_text(s)) ==
    normalize_text(s)``.
    """
    s = s.translate(_TRANSLATE)
    s = unicodedata.normalize("NFKC", s).casefold()
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = s.translate(_TRANSLATE)  # NFKC can produce new dashes/quotes (e.g. from ﹣)
    s = _NOT_KEPT.sub(" ", s)
    s = _LONE_APOSTROPHE.sub("", s)
    return _SPACES.sub(" ", s).strip()
