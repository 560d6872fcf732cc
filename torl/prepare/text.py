"""Question text reduced to what identity and overlap should see.

Two views of one question. ``question_key`` decides exact duplicates: formatting that never changes a problem
(case, spacing, ``$``, ``\\left``/``\\right``, ``\\dfrac``) vanishes, every symbol stays. ``words`` feeds similarity:
lower-case words and numbers only (LaTeX command names stay as words), so two transcriptions of one problem, which
differ in markup far more than in wording, still share most of their n-grams.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_SIZING = re.compile(r"\\(?:left|right|bigg|big)(?![a-z])")  # applied after lower-casing: \Big is \big
_SPACING = re.compile(r"\\[,;:! ]|~")
_WORD = re.compile(r"[a-z]+|\d+")


def _lower(text: str) -> str:
    s = unicodedata.normalize("NFKC", text).lower()
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def question_key(text: str) -> str:
    """The question with formatting noise removed; equal keys are exact duplicates.

    >>> question_key("Find $\\\\dfrac{1}{2}$ of  10.") == question_key("find \\\\frac{1}{2} of 10")
    True
    """
    s = _SPACING.sub("", _SIZING.sub("", _lower(text))).replace("$", "")
    return re.sub(r"\s+", "", s).rstrip(".")


def words(text: str) -> list[str]:
    """Lower-case words and numbers in order (punctuation and math symbols dropped).

    >>> words("Let $x^2 = 25$; find \\\\left(x\\\\right).")
    ['let', 'x', '2', '25', 'find', 'x']
    """
    return _WORD.findall(_SIZING.sub(" ", _lower(text)))


def ngrams(tokens: list[str], n: int) -> frozenset[str]:
    """The set of word n-grams; a text shorter than n words is one "n-gram" of all its words (so it is not empty)."""
    if len(tokens) < n:
        return frozenset([" ".join(tokens)]) if tokens else frozenset()
    return frozenset(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def content_id(key: str) -> str:
    """A stable id from a ``question_key``: the same problem gets the same id in every preparation run, which is what
    lets a training run's per-problem rewards and an evaluation's pass rates find it again."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
