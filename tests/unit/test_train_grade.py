"""jobs/loop.py's grade(): the grader's verdicts, then DAPO's overlong shaping and filtering on training batches
only. A fake grader and a stand-in for ``ray.get`` keep it to milliseconds."""

from __future__ import annotations

import sys
import types

import pytest

from jobs import loop
from torl.config import Config, RewardConfig, RolloutConfig
from torl.rollout.types import ToolCall, Trajectory

LIMIT = 10  # rollout.max_response_tokens


class FakeGrader:
    """``run.grader.grade.remote(items)``: every answer correct, reward 1."""

    def __init__(self) -> None:
        self.grade = self

    def remote(self, items: list) -> list[tuple[float, bool]]:
        return [(1.0, True)] * len(items)


@pytest.fixture
def batch(monkeypatch) -> list[Trajectory]:
    """Responses of 5 and 8 tokens that ended on their own and one of 10 cut off at the limit."""
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=lambda value: value))
    out = []
    for n, reason in ((5, "eos"), (8, "eos"), (LIMIT, "length")):
        out.append(Trajectory(f"p{n}", 0, [1], [2] * n, [0.0] * n, [1] * n, [0] * n, finish_reason=reason))
    return out


def _run(**reward) -> types.SimpleNamespace:
    cfg = Config(rollout=RolloutConfig(max_response_tokens=LIMIT), reward=RewardConfig(**reward))
    return types.SimpleNamespace(cfg=cfg, grader=FakeGrader())


def test_overlong_shaping_is_added_to_training_rewards(batch):
    """Buffer 4 below the limit of 10: nothing up to 6 tokens, -0.5 at 8, the whole -1 at 10 (DAPO's soft overlong
    punishment, torl.rl.grading.overlong_penalty), on top of the grader's reward; correctness is the grader's (#30)."""
    loop.grade(_run(overlong_buffer=4, overlong_penalty=1.0), batch)
    assert [t.reward for t in batch] == pytest.approx([1.0, 0.5, 0.0])
    assert all(t.correct for t in batch) and all(all(t.loss_mask) for t in batch)


def test_mask_truncated_takes_cut_off_responses_out_of_the_loss(batch):
    """reward.mask_truncated: the response cut off at the limit keeps its reward but no token trains; the long one
    that ended on its own trains as before (DAPO's overlong filtering) (#30)."""
    loop.grade(_run(mask_truncated=True), batch)
    assert [t.reward for t in batch] == [1.0, 1.0, 1.0]
    assert [sum(t.loss_mask) for t in batch] == [5, 8, 0]


def test_validation_is_graded_unshaped(batch):
    loop.grade(_run(overlong_buffer=4, mask_truncated=True), batch, shape=False)
    assert [t.reward for t in batch] == [1.0, 1.0, 1.0] and [sum(t.loss_mask) for t in batch] == [5, 8, LIMIT]


def test_each_tool_call_is_priced_in_training_rewards_only(batch):
    """reward.tool_call_cost: a response with two executed calls loses twice the price, one with none keeps the
    grader's reward; validation scores correctness alone (#33)."""
    call = ToolCall(code="print(1)", observation="1", status="ok", exec_s=0.0, queue_s=0.0)
    batch[1].tool_calls, batch[2].tool_calls = [call], [call, call]
    loop.grade(_run(tool_call_cost=0.25), batch)
    assert [t.reward for t in batch] == pytest.approx([1.0, 0.75, 0.5])
    loop.grade(_run(tool_call_cost=0.25), batch, shape=False)
    assert [t.reward for t in batch] == [1.0, 1.0, 1.0]
