"""DAPO's dynamic sampling: fill a step's batch with prompt groups whose correctness varies, drawing more if needed.

A group whose n samples were all right (or all wrong) teaches nothing about solving the problem. DAPO (arXiv
2503.14476, section 3.2) over-samples instead: keep the groups with ``0 < #correct < n``, draw and roll out further
prompt batches until ``data.batch_size`` such groups are in hand, and train on exactly that many. The number of extra
draws is bounded (``algo.dynamic_sampling_max_draws``); at the bound the step trains on the groups it has, and says
so. The driver does the drawing; this is the bookkeeping.

The criterion is correctness, not reward (``algo.dynamic_sampling_metric``, veRL's ``filter_groups.metric``): with
overlong shaping four correct answers can score [1, 1, 1, 0.34], and keeping that group for its reward variance
trains a pure length signal at full advantage in a slot a group with accuracy variance should have had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torl.rollout.types import Trajectory

GroupMetric = Literal["acc", "reward"]


def group_signal(trajs: Sequence[Trajectory], metric: GroupMetric) -> list[float]:
    """Per trajectory, the value whose spread within a group decides whether the group is kept: 1.0/0.0 for a
    correct/wrong answer (``acc``), or the shaped reward (``reward``). The learner's ``zero_var_group_share`` uses
    the same values, so it reports what dynamic sampling filters on."""
    if metric == "acc":
        return [float(t.correct) for t in trajs]
    return [t.reward for t in trajs]


def draw_seed_step(step: int, draw: int) -> int:
    """The seed ingredient (``GenRequest.step``) of rollout batch ``draw`` of training step ``step``.

    The step's own batch (draw 0) keeps ``step``; each further draw gets a value no other (step, draw) pair gives, so
    a problem drawn twice in one step (the epoch wraps between draws) samples two random streams instead of one
    stream twice, while a rerun of the step (a resume) samples the same ones. Further draws map to negative values
    (training steps are >= 0) by Cantor pairing, which is one-to-one.
    """
    if draw == 0:
        return step
    return -((step + draw) * (step + draw + 1) // 2 + draw)


@dataclass
class VariedBatch:
    """Collects groups that vary by ``metric`` (``group_signal``), in the order they arrive, up to ``want`` groups."""

    want: int
    metric: GroupMetric = "acc"
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
            if self.full or len(set(group_signal(members, self.metric))) < 2:
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
