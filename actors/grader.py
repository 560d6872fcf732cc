"""The grader actor: scores a batch of responses against gold answers, returning (reward, correct) per response.

A thin shell over ``torl.rl.grading.score``. Every answer check runs in a helper process with a deadline
(``RewardConfig.grade_timeout_s``), so this actor may be sync or async and may run methods concurrently; a
pathological answer costs at most the timeout and counts as wrong. ``grade`` never raises for a bad item.

Not here: the equivalence rules (``torl/rl/grading.py``) and accuracy metrics (``torl/rollout/metrics.py``).
"""

from __future__ import annotations

import logging
import time

import ray

from torl.config import Config, RewardConfig
from torl.rl.grading import score, shutdown_helpers, worker_stats

log = logging.getLogger(__name__)

GradeItem = tuple[str, str, bool, bool]  # (response text, gold answer, attempted code, attempted code failed)


class Grader:
    def __init__(self, cfg: RewardConfig | Config | None = None) -> None:
        cfg = cfg or RewardConfig()
        self.cfg = cfg.reward if isinstance(cfg, Config) else cfg
        self.graded = 0
        self.errors = 0
        self.grade_s = 0.0

    def grade(self, items: list[GradeItem]) -> list[tuple[float, bool]]:
        """(reward, correct) for each (text, gold, attempted_code, code_failed); a failing item is (wrong, False)."""
        t0 = time.perf_counter()
        out = []
        for i, item in enumerate(items):
            try:
                text, gold, attempted, failed = item
                out.append(score(str(text), str(gold), self.cfg, bool(attempted), bool(failed)))
            except Exception:  # noqa: BLE001 - one bad item must not fail the batch (or the training step)
                self.errors += 1
                log.exception("grading item %d failed; scored as wrong", i)
                out.append((self.cfg.wrong, False))
        self.graded += len(items)
        self.grade_s += time.perf_counter() - t0
        return out

    def stats(self) -> dict[str, float]:
        """Counters since start: items graded, item errors, check timeouts, helper restarts, seconds spent."""
        return {
            "grader/items": float(self.graded),
            "grader/errors": float(self.errors),
            "grader/seconds": self.grade_s,
            **{f"grader/{k}": float(v) for k, v in worker_stats().items()},
        }

    def shutdown(self) -> None:
        shutdown_helpers()


# num_cpus=0: grading is light and mostly waits on its helper process; a default actor reserves a whole CPU for
# placement, which on a 2-core cluster can leave no room for the generator and learner.
GraderActor = ray.remote(num_cpus=0)(Grader)
