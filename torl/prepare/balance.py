"""Difficulty balancing from measured pass rates: keep problems a model can learn from, spread evenly over difficulty.

GRPO learns nothing from a problem whose n samples are all right or all wrong (every advantage is zero), so those go
first. The rest are binned by pass rate (equal-width bins over [0, 1]) and each bin is cut to the same size (a random,
seeded sample), so easy problems, which dominate most pools for a given model, stop dominating training. Pass rates
come from the evaluation job run on the prepared file with ``eval.greedy=false eval.n=<n> eval.top_p=1.0`` (its
pass_rates.jsonl; top-p as in training).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence


def pass_rate_bin(rate: float, bins: int) -> int:
    """Equal-width bin of a pass rate: [0, 1/b), [1/b, 2/b), ..., [(b-1)/b, 1]."""
    return min(int(rate * bins), bins - 1)


def balance(
    ids: Sequence[str],
    rates: Mapping[str, float],
    bins: int,
    per_bin: int = 0,
    drop_solved: bool = True,
    drop_unsolved: bool = True,
    keep_unmeasured: bool = False,
    seed: int = 1,
) -> tuple[list[str], dict[str, str]]:
    """(kept ids in their given order, {dropped id: why}).

    ``per_bin`` caps every bin; 0 = the size of the smallest non-empty bin (a flat difficulty histogram).
    """
    if bins < 1:
        raise ValueError(f"balance.bins must be >= 1, got {bins}")
    dropped: dict[str, str] = {}
    by_bin: dict[int, list[str]] = {}
    for pid in ids:
        rate = rates.get(pid)
        if rate is None:
            if not keep_unmeasured:
                dropped[pid] = "no pass rate measured"
            continue
        if drop_solved and rate >= 1.0:
            dropped[pid] = "every sample correct (pass rate 1): no learning signal"
        elif drop_unsolved and rate <= 0.0:
            dropped[pid] = "no sample correct (pass rate 0): no learning signal"
        else:
            by_bin.setdefault(pass_rate_bin(rate, bins), []).append(pid)
    cap = per_bin if per_bin > 0 else min((len(v) for v in by_bin.values()), default=0)
    rng = random.Random(seed)
    for b, members in sorted(by_bin.items()):
        if len(members) > cap:
            keep = set(rng.sample(sorted(members), cap))
            lo, hi = b / bins, (b + 1) / bins
            for pid in members:
                if pid not in keep:
                    dropped[pid] = f"pass-rate bin [{lo:.2f}, {hi:.2f}] over its share ({cap} of {len(members)} kept)"
    return [pid for pid in ids if pid not in dropped], dropped
