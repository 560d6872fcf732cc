"""jobs/loop.py's RolloutQueue against a fake run: which rollouts a checkpoint keeps, and that a resumed run trains on
exactly the batches the interrupted one would have, whatever trainer.max_staleness it resumes with."""

from __future__ import annotations

import copy

from jobs.loop import RolloutQueue
from torl.config import Config, TrainerConfig
from torl.data.sampler import PromptSampler


class FakeRun:
    """The few ``Run`` members the queue uses. A rollout is (the problems it sampled, {}); one still decoding is a
    list of shards (here the problems themselves), which ``collect`` finishes."""

    def __init__(self, staleness: int) -> None:
        self.cfg = Config(trainer=TrainerConfig(max_staleness=staleness))
        self.sampler = PromptSampler([f"p{i}" for i in range(20)], batch_size=2, seed=1, shuffle=False)

    def draw(self):
        before = copy.copy(self.sampler.state)
        return self.sampler.next_batch(), before

    def generate(self, batch, step):
        return list(batch)

    def collect(self, shards):
        return list(shards), {}


def _steps(queue: RolloutQueue, ahead: int, n: int) -> list[list[str]]:
    """``n`` steps of train()'s loop around the queue (fill before and after each step, as it does)."""
    trained = []
    queue.fill(1)
    for _ in range(n):
        trajs, _ = queue.next()
        queue.fill(ahead)
        trained.append(trajs)
        queue.fill(1)
    return trained


def _resume(staleness: int, state, restored, start: int) -> tuple[FakeRun, RolloutQueue]:
    run = FakeRun(staleness)
    run.sampler.state = copy.copy(state)
    return run, RolloutQueue(run, start=start, total=100, restored=restored)


def test_rollouts_restored_from_a_pipelined_checkpoint_survive_a_resume_at_staleness_0():
    """A checkpoint at k=2 holds the two rollouts ahead; resumed with trainer.max_staleness=0 (allowed: not part of
    the run's identity) and checkpointed again after one step, the second restored rollout must be in the new
    checkpoint. It was dropped (#30): the on-policy branch treated it as a rollout to redo from its sampler state,
    which for a restored rollout is the state after it, so that batch was never trained."""
    pipelined = FakeRun(staleness=2)
    queue = RolloutQueue(pipelined, start=0, total=100)
    queue.fill(2)
    state, ahead = queue.checkpoint()  # saved at step 0 with steps 1 and 2 rolled out ahead
    assert [trajs for trajs, _ in ahead] == [["p0", "p1"], ["p2", "p3"]]

    _, queue = _resume(0, state, ahead, start=0)
    assert _steps(queue, 0, 1) == [["p0", "p1"]]
    state, kept = queue.checkpoint()  # at step 1, staleness 0
    assert [trajs for trajs, _ in kept] == [["p2", "p3"]]

    _, queue = _resume(0, state, kept, start=1)
    assert _steps(queue, 0, 2) == [["p2", "p3"], ["p4", "p5"]]  # the restored batch first, then the next draw


def test_on_policy_checkpoint_redoes_the_rollout_started_on_its_weights():
    """Staleness 0 without restored rollouts: the one rollout pending was started on the checkpoint's own weights, so
    the checkpoint keeps none and the sampler state before it, and the resumed run draws that batch again."""
    run = FakeRun(staleness=0)
    queue = RolloutQueue(run, start=0, total=100)
    assert _steps(queue, 0, 1) == [["p0", "p1"]]
    state, kept = queue.checkpoint()
    assert kept == [] and (state.epoch, state.position) == (0, 2)
    _, resumed = _resume(0, state, kept, start=1)
    assert _steps(resumed, 0, 1) == [["p2", "p3"]]
