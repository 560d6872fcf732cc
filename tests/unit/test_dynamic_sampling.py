"""DAPO's dynamic sampling bookkeeping: varied groups kept in arrival order, renumbered, capped at the batch size."""

from torl.dynamic_sampling import VariedBatch
from torl.types import Trajectory


def _rollout(rewards_per_group: list[list[float]], tag: str) -> list[Trajectory]:
    return [
        Trajectory(f"{tag}{g}", g, [1, 2], [3], [0.0], [1], [0], reward=r)
        for g, rewards in enumerate(rewards_per_group)
        for r in rewards
    ]


def test_refills_to_the_batch_size_with_varied_groups_only():
    batch = VariedBatch(want=3)
    batch.add(_rollout([[1, 1], [1, -1], [-1, -1]], "a"))  # one varied group of three
    assert not batch.full and len(batch.groups) == 1
    batch.add(_rollout([[-1, -1], [1, -1], [1, 1]], "b"))
    assert not batch.full
    batch.add(_rollout([[1, -1], [-1, 1], [1, -1]], "c"))  # two more wanted, three offered: the first two kept
    assert batch.full
    trajs = batch.trajectories()
    assert [t.problem_id for t in trajs] == ["a1", "a1", "b1", "b1", "c0", "c0"]
    assert [t.group for t in trajs] == [0, 0, 1, 1, 2, 2]  # distinct ids across rollouts (each restarts at 0)
    assert all(len({t.reward for t in g}) == 2 for g in batch.groups)
    m = batch.metrics()
    assert m["dynamic/draws"] == 3 and m["dynamic/groups_seen"] == 9 and m["dynamic/batch_groups"] == 3
    assert m["dynamic/varied_share"] == 3 / 9


def test_a_first_batch_with_enough_variance_needs_no_draw():
    batch = VariedBatch(want=2)
    batch.add(_rollout([[1, -1], [-1, 1]], "a"))
    assert batch.full and batch.draws == 1 and len(batch.trajectories()) == 4


def test_all_equal_rewards_leave_nothing():
    batch = VariedBatch(want=2)
    batch.add(_rollout([[1, 1, 1], [-1, -1, -1]], "a"))
    assert not batch.full and batch.trajectories() == [] and batch.metrics()["dynamic/varied_share"] == 0.0
