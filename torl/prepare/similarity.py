"""Which questions are nearly the same: near duplicates within the training pool, overlap with evaluation sets.

Near duplicates: Jaccard similarity of word n-gram sets, found exactly with prefix filtering (the all-pairs
similarity-join trick): sort each set's n-grams rarest first; two sets with Jaccard >= t must share one of the first
``|x| - ceil(t|x|) + 1`` n-grams of each, so only such pairs are compared and no pair above the threshold is missed
(MinHash would miss some, at random). Decontamination (``CopyIndex``): a training question is a copy of an
evaluation problem when their texts, typesetting and boilerplate sentences removed (``torl.prepare.text``), are
similar character by character (difflib's ratio) and their answers are equivalent (the pipeline checks that). Word
n-grams missed copies that differ in typesetting (``x^{4}+j x^{2}`` is three words apart from ``x^4 + jx^2``) or in one
inserted word, and matched problems sharing only an instruction ("Enter your answer in the form ...") or a frame with
one number changed.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

_EPS = 1e-9  # t * |x| computed in floats: 0.7 * 10 = 7.000000000000001 must not round up to 8


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def near_duplicates(
    sets: Sequence[frozenset[str]],
    threshold: float,
    tick: Callable[[], None] | None = None,
    accept: Callable[[int, int], bool] | None = None,
) -> dict[int, tuple[int, float]]:
    """``{index: (index of the kept set it repeats, similarity)}``, greedily in order: each set is compared with the
    earlier sets that were kept, so the first of a group of near duplicates stays. ``accept(i, j)`` can veto a pair
    that is similar enough (different answers: a variant, not a repeat). Empty sets are never duplicates."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must lie in (0, 1], got {threshold}")
    freq = Counter(g for s in sets for g in s)
    index: dict[str, list[int]] = defaultdict(list)
    found: dict[int, tuple[int, float]] = {}
    for i, s in enumerate(sets):
        ordered = sorted(s, key=lambda g: (freq[g], g))
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered) - _EPS) + 1] if ordered else []
        best: tuple[int, float] | None = None
        compared: set[int] = set()
        for g in prefix:
            for j in index.get(g, ()):
                if j in compared:
                    continue
                compared.add(j)
                other = sets[j]
                if min(len(s), len(other)) < threshold * max(len(s), len(other)) - _EPS:
                    continue  # sizes alone rule out Jaccard >= threshold
                sim = jaccard(s, other)
                if sim >= threshold - _EPS and (best is None or sim > best[1]) and (accept is None or accept(i, j)):
                    best = (j, sim)
        if best is not None:
            found[i] = best
        else:
            for g in prefix:
                index[g].append(i)
        if tick is not None:
            tick()
    return found


@dataclass(frozen=True)
class Overlap:
    """A training question's similarity to one evaluation problem."""

    eval_set: str
    problem_id: str
    score: float  # difflib's ratio of the two texts: 2 * matching characters / both lengths


def char_similarity(a: str, b: str) -> float:
    """difflib's ratio, 2M / (|a| + |b|) with M the characters in matching blocks: 1.0 for equal texts, ~0.95 for one
    inserted word in a short question, ~0.5 for two problems that only share their frame. Junk heuristics off (they
    would skip frequent characters such as ``\\`` and ``^``, which carry the formulas). difflib's greedy block search
    depends on argument order, so the pair is put in a fixed order: the value is symmetric."""
    return _matcher(a, b).ratio()


def _matcher(a: str, b: str) -> SequenceMatcher:
    first, second = sorted((a, b), key=lambda s: (len(s), s))
    return SequenceMatcher(None, first, second, autojunk=False)


class CopyIndex:
    """Evaluation problems' texts (``match_text``, boilerplate left out), looked up by training questions.

    Comparing every training question with every evaluation problem character by character is ~10^7 difflib calls
    for MATH against the five benchmarks. Candidates first: the problems sharing at least ``CANDIDATE_SHARE`` of the
    shorter text's character ``CANDIDATE_NGRAM``-grams (a copy at ratio >= 0.8 shares most of them: its differences are
    a few local edits); only those get the exact ratio, after difflib's cheap upper bounds.
    """

    CANDIDATE_NGRAM = 5
    CANDIDATE_SHARE = 0.3

    def __init__(self) -> None:
        self.postings: dict[str, list[int]] = defaultdict(list)
        self.entries: list[tuple[str, str, str, int]] = []  # (eval set, problem id, text, number of n-grams)

    def _grams(self, text: str) -> frozenset[str]:
        n = self.CANDIDATE_NGRAM
        return frozenset(text[i : i + n] for i in range(max(1, len(text) - n + 1))) if text else frozenset()

    def add(self, eval_set: str, problem_id: str, text: str) -> None:
        grams = self._grams(text)
        for g in grams:
            self.postings[g].append(len(self.entries))
        self.entries.append((eval_set, problem_id, text, len(grams)))

    def similar(self, text: str, threshold: float) -> list[Overlap]:
        """Evaluation problems whose ``char_similarity`` with ``text`` reaches ``threshold``, best first."""
        grams = self._grams(text)
        shared = Counter(j for g in grams for j in self.postings.get(g, ()))
        found = []
        for j, count in shared.items():
            eval_set, problem_id, other, size = self.entries[j]
            if count < self.CANDIDATE_SHARE * min(len(grams), size):
                continue
            matcher = _matcher(text, other)
            if matcher.real_quick_ratio() < threshold - _EPS or matcher.quick_ratio() < threshold - _EPS:
                continue
            score = matcher.ratio()
            if score >= threshold - _EPS:
                found.append(Overlap(eval_set, problem_id, score))
        return sorted(found, key=lambda o: (-o.score, o.eval_set, o.problem_id))
