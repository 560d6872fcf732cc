"""Question text reduced to what identity and overlap should see.

Three views of one question. ``question_key`` decides exact duplicates: formatting that never changes a problem
(case, spacing, ``$``, ``\\left``/``\\right``, ``\\dfrac``) vanishes, every symbol stays. ``words`` feeds
near-duplicate search in the pool: lower-case words and numbers only (LaTeX command names stay as words).
``match_text`` feeds decontamination: ``question_key`` without braces and with no space at all, so two typesettings
of one formula (OlympiadBench's ``x^{4}+j x^{2}``, MATH's ``x^4 + jx^2``) become one string, compared character by
character; before that, ``sentences`` and ``common_sentences`` find the boilerplate many problems share ("Express your
answer as a common fraction.", MATH's factorial reminder), which says nothing about which problem a question is.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

_SIZING = re.compile(r"\\(?:left|right|bigg|big)(?![a-z])")  # applied after lower-casing: \Big is \big
_SPACING = re.compile(r"\\[,;:! ]|~")
_WORD = re.compile(r"[a-z]+|\d+")
_FRAC_DIGITS = re.compile(r"\\[dt]?frac(\d)(\d)")  # MATH's \frac12 shorthand
_THOUSANDS = re.compile(r"(\d),(?:\\!)?(\d{3})(?!\d)")  # "1, 350" is a list
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_TYPESETTING = re.compile(r"\\[,;:! ]|~|[${}\s]")
# A sentence ends at . or ? followed by space (a closing $ may sit between: "area $\\frac{35}{37}.$  If"), or at a
# line break. Periods inside formulas ("0.5", "\\dots") have no space after them; "!" is a factorial far more often
# than an exclamation ("the end of $42!$ (42 factorial)").
_SENTENCE_END = re.compile(r"(?<=[.?])\$?\s+|\s*\n\s*")


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


def match_text(text: str) -> str:
    """The question as decontamination compares it: ``question_key`` with braces and every space removed.

    >>> match_text("Find $x^{4}+j x^{2}$.") == match_text("find x^4 + jx^2.")
    True
    """
    return _TYPESETTING.sub("", _SIZING.sub("", _lower(text)))


def sentences(text: str) -> list[str]:
    """The question's sentences as ``match_text``, in order, empty ones dropped.

    >>> sentences("Let $a = 2$.  Find $a^{2}$?\\nEnter an integer.")
    ['leta=2.', 'finda^2?', 'enteraninteger.']
    """
    return [m for m in (match_text(s) for s in _SENTENCE_END.split(text)) if m]


def common_sentences(texts: Iterable[str], min_questions: int) -> frozenset[str]:
    """Sentences (as ``match_text``) found in at least ``min_questions`` of the texts, each text counted once: the
    instructions and reminders problem sets repeat. A sentence of a problem and of its one copy occurs twice."""
    counts = Counter(s for t in texts for s in set(sentences(t)))
    return frozenset(s for s, c in counts.items() if c >= min_questions)


def without_sentences(text: str, drop: frozenset[str]) -> str:
    """``match_text`` of the question with the sentences in ``drop`` left out."""
    return "".join(s for s in sentences(text) if s not in drop)


def numbers(text: str) -> frozenset[str]:
    """The numbers a question states, as written (``\\frac12`` is 1 and 2, ``10,\\!000`` is 10000): two similar
    questions with different numbers are variants, another problem, however few characters changed.

    >>> sorted(numbers("Find $\\\\frac12$ of $10,\\\\!000$ and of 5.6."))
    ['1', '10000', '2', '5.6']
    """
    s = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", text)
    return frozenset(_NUMBER.findall(_THOUSANDS.sub(r"\1\2", s)))


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
