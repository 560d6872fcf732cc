"""DAPO's dynamic sampling: fill a step's batch with prompt groups whose rewards differ, drawing more if needed.

A group whose n samples all got the same reward has zero advantage under GRPO: it adds no gradient, only tokens to
the token-mean's denominator. DAPO (arXiv 2503.14476, section 3.2) over-samples instead: keep the groups with reward
variance, draw and roll out further prompt batches until ``data.batch_size`` such groups are in hand, and train on
exactly that many. The number of extra draws is bounded (``algo.dynamic_sampling_max_draws``); at the bound the step
trains on the groups it has, and says so. The driver does the drawing; this is the bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torl.types import Trajectory


@dataclass
class VariedBatch:
    """Collects groups with reward variance, in the order they arrive, up to ``want`` groups."""

    want: int
    groups: list[list[Trajectory]] = field(default_factory=list)
    seen: int = 0  # groups looked at, kept or not
    draws: int = 0  # prompt batches added

    @property
    def full(self) -> bool:
        return len(self.groups) >= self.want

    def add(self, trajs: list[Trajectory]) -> None:
        """Keep this rollout's varied groups (graded already), renumbered after those in hand, until full.

        Group ids are per rollout batch (the prompt's index in it), so a second batch reuses them; renumbering
        keeps each kept group distinct for the advantage computation.
        """
        self.draws += 1
        by_group: dict[int, list[Trajectory]] = {}
        for t in trajs:
            by_group.setdefault(t.group, []).append(t)
        for members in by_group.values():
            self.seen += 1
            if self.full or len({t.reward for t in members}) < 2:
                continue
            for t in members:
                t.group = len(self.groups)
            self.groups.append(members)

    def trajectories(self) -> list[Trajectory]:
        return [t for g in self.groups for t in g]

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic/draws": float(self.draws),
            "dynamic/groups_seen": float(self.seen),
            "dynamic/varied_share": len(self.groups) / max(self.seen, 1),
            "dynamic/batch_groups": float(len(self.groups)),
        }
