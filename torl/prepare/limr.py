"""LIMR's learning-impact score: how closely a problem's reward curve follows the run's average learning curve.

LIMR (Li et al. 2025, "LIMR: Less is More for RL Scaling"; docs/torl-behaviour.md ("Training data")) trains once
on the whole pool, records every problem's reward r_i^k at each epoch k, and averages them into the run's curve
r_avg^k. A problem scores

    s_i = 1 - sum_k (r_i^k - r_avg^k)^2 / sum_k (1 - r_avg^k)^2

1 when it tracks the average exactly; 0 when it is as far from it as a problem solved from the start (the
normaliser is that problem's deviation); negative when further still. Problems that are always solved or never solved
carry no learning signal and score low; LIMR kept s >= 0.6 (1,389 of MATH's 8,523 level 3-5 problems).

Here point k is the k-th time the problem was sampled (once per epoch under ``data.shuffle``, as LIMR's epochs), r is
the share of its samples that were correct (LIMR's [0, 1] scale; torl's reward is +1/-1), and r_avg^k averages the
problems that have a k-th point. A problem is scored over its own points, so one missed in an epoch's dropped tail
is not penalised for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def average_curve(curves: Mapping[str, Sequence[float]]) -> list[float]:
    """r_avg^k for every k that some problem reached: the mean of the k-th points that exist."""
    length = max((len(c) for c in curves.values()), default=0)
    sums, counts = [0.0] * length, [0] * length
    for curve in curves.values():
        for k, r in enumerate(curve):
            sums[k] += r
            counts[k] += 1
    return [s / n for s, n in zip(sums, counts, strict=True)]


def lim_score(curve: Sequence[float], average: Sequence[float]) -> float:
    """LIMR's s_i over the problem's points. Where the average is 1 at all of them (everything solved, nothing
    learned) the normaliser is 0 and the score is 0, as for any always-solved problem."""
    if not curve or len(curve) > len(average):
        raise ValueError(f"a curve of {len(curve)} points needs an average of at least that many (has {len(average)})")
    norm = sum((1.0 - a) ** 2 for a in average[: len(curve)])
    if norm == 0.0:
        return 0.0
    return 1.0 - sum((r - a) ** 2 for r, a in zip(curve, average, strict=False)) / norm


def lim_scores(curves: Mapping[str, Sequence[float]], min_points: int = 2) -> dict[str, float]:
    """Scores of the problems sampled at least ``min_points`` times (one point says nothing about a trajectory).
    The average curve is taken over every problem, scored or not: it is the run's learning curve."""
    average = average_curve(curves)
    return {pid: lim_score(c, average) for pid, c in curves.items() if len(c) >= max(1, min_points)}


def select(scores: Mapping[str, float], min_score: float, max_keep: int = 0) -> list[str]:
    """Ids scoring at least ``min_score``, best first (ties by id), at most ``max_keep`` of them (0 = no cap)."""
    ranked = sorted((pid for pid, s in scores.items() if s >= min_score), key=lambda pid: (-scores[pid], pid))
    return ranked[:max_keep] if max_keep > 0 else ranked
