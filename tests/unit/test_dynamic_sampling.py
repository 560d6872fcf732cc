"""DAPO's dynamic sampling bookkeeping: varied groups kept in arrival order, renumbered, capped at the batch size."""

from torl.rl.dynamic_sampling import VariedBatch, group_signal
from torl.rl.grading import overlong_penalty
from torl.rl.grpo import zero_variance_groups
from torl.rollout.types import Trajectory


def _rollout(rewards_per_group: list[list[float]], tag: str) -> list[Trajectory]:
    """Groups of trajectories with these rewards; a positive reward is a correct answer."""
    return [
        Trajectory(f"{tag}{g}", g, [1, 2], [3], [0.0], [1], [0], reward=r, correct=r > 0)
        for g, rewards in enumerate(rewards_per_group)
        for r in rewards
    ]


def _overlong_correct_group() -> list[Trajectory]:
    """The issue's example (#30) under configs/dapo.yaml: four correct answers of 1200/1500/2000/2900 tokens with
    L_max 3072 and a 512-token buffer score [1, 1, 1, 0.34] after DAPO's overlong punishment."""
    rewards = [1.0 + overlong_penalty(n, 3072, 512, 1.0) for n in (1200, 1500, 2000, 2900)]
    assert rewards[:3] == [1.0, 1.0, 1.0] and abs(rewards[3] - 0.336) < 1e-3
    return [Trajectory("p", 0, [1, 2], [3], [0.0], [1], [0], reward=r, correct=True) for r in rewards]


def test_a_group_all_correct_is_dropped_by_accuracy_though_its_shaped_rewards_differ():
    by_acc = VariedBatch(want=1)  # the default criterion: DAPO's 0 < #correct < n
    by_acc.add(_overlong_correct_group())
    assert by_acc.groups == []
    by_reward = VariedBatch(want=1, metric="reward")
    by_reward.add(_overlong_correct_group())
    assert len(by_reward.groups) == 1


def test_zero_variance_share_follows_the_same_criterion():
    """The learner counts zero-variance groups with ``group_signal`` of the configured metric: the all-correct group
    is one of them under ``acc`` (a group with one wrong answer is not), none under ``reward``."""
    trajs = _overlong_correct_group() + _rollout([[], [1, -1]], "b")
    groups = [t.group for t in trajs]
    assert zero_variance_groups(group_signal(trajs, "acc"), groups) == {0}
    assert zero_variance_groups(group_signal(trajs, "reward"), groups) == set()


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


def test_each_draw_of_a_step_seeds_its_sampling_apart(monkeypatch):
    """A problem drawn again within one step (the epoch wrapped between draws) gets new sampling seeds in each draw,
    and the same ones when the step is rerun: keep_varied seeds draw k by ``draw_seed_step(step, k)``."""
    from jobs import loop
    from torl.config import AlgoConfig, Config, DataConfig
    from torl.rl.dynamic_sampling import draw_seed_step
    from torl.rollout.tool_loop import derive_seed

    class FakeRun:  # every draw offers the same problem, never varied: keep_varied draws up to its bound
        cfg = Config(data=DataConfig(batch_size=1), algo=AlgoConfig(dynamic_sampling_max_draws=3))

        def __init__(self) -> None:
            self.steps: list[int] = []

        def draw(self):
            return ["p"], None

        def generate(self, prompts, step):
            self.steps.append(step)
            return prompts

        def collect(self, shards):
            return _rollout([[1, 1]], "p"), {}

    monkeypatch.setattr(loop, "grade", lambda run, trajs: None)

    def seeds(step: int) -> list[int]:
        run = FakeRun()
        loop.keep_varied(run, _rollout([[1, 1]], "p"), step, {}, lambda _: None)
        assert len(run.steps) == 2
        # the step's own batch was sampled with GenRequest.step = step (RolloutQueue.fill)
        return [derive_seed(1, "p0", 0, 0, s) for s in [step, *run.steps]]

    assert len(set(seeds(5))) == 3 and seeds(5) == seeds(5)
    keys = {draw_seed_step(step, draw) for step in range(50) for draw in range(12)}
    assert len(keys) == 50 * 12  # no two (step, draw) pairs share a seed ingredient
