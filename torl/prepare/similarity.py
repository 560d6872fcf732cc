"""Which questions are nearly the same: near duplicates within the training pool, overlap with evaluation sets.

Near duplicates: Jaccard similarity of word n-gram sets, found exactly with prefix filtering (the all-pairs
similarity-join trick): sort each set's n-grams rarest first; two sets with Jaccard >= t must share one of the first
``|x| - ceil(t|x|) + 1`` n-grams of each, so only such pairs are compared and no pair above the threshold is missed
(MinHash would miss some, at random). Decontamination: a training question overlaps an evaluation problem when the
share of shared word n-grams, over the shorter of the two, reaches the threshold; a short question inside a long one
still counts, while the stock phrases competition problems share ("relatively prime positive integers. Find m+n")
stay far below it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torl.prepare.text import ngrams, words

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
    """A training question's overlap with one evaluation problem."""

    eval_set: str
    problem_id: str
    score: float  # shared n-grams / n-grams of the shorter question


class NgramIndex:
    """Word n-grams of evaluation problems, looked up by training questions."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n}")
        self.n = n
        self.postings: dict[str, list[int]] = defaultdict(list)
        self.entries: list[tuple[str, str, int]] = []  # (eval set, problem id, number of n-grams)

    def add(self, eval_set: str, problem_id: str, question: str) -> None:
        grams = ngrams(words(question), self.n)
        for g in grams:
            self.postings[g].append(len(self.entries))
        self.entries.append((eval_set, problem_id, len(grams)))

    def overlaps(self, question: str, threshold: float) -> list[Overlap]:
        """Evaluation problems sharing at least ``threshold`` of the shorter question's n-grams, best first."""
        grams = ngrams(words(question), self.n)
        shared = Counter(j for g in grams for j in self.postings.get(g, ()))
        found = []
        for j, count in shared.items():
            eval_set, problem_id, size = self.entries[j]
            score = count / min(len(grams), size)
            if score >= threshold - _EPS:
                found.append(Overlap(eval_set, problem_id, score))
        return sorted(found, key=lambda o: (-o.score, o.eval_set, o.problem_id))
