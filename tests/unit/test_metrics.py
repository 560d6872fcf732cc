"""rollout_metrics: ToRL's analysis metrics on hand-built trajectories."""

import math

import pytest

from torl.metrics import is_effective_code, rollout_metrics
from torl.types import ToolCall, Trajectory


def call(status: str = "ok") -> ToolCall:
    return ToolCall(code="print(1)", observation="1", status=status, exec_s=0.01, queue_s=0.0)


def traj(correct: bool, calls: list[ToolCall] = (), n_tokens: int = 10, finish: str = "eos", text: str = ""):
    return Trajectory(
        problem_id="p",
        group=0,
        prompt_ids=[1, 2],
        response_ids=list(range(n_tokens)),
        tool_calls=list(calls),
        finish_reason=finish,
        text=text,
        reward=1.0 if correct else -1.0,
        correct=correct,
    )


CODE_THEN_BOX = "```python\nprint(1)\n```\n```output\n1\n```\nSo \\boxed{1}"
BOX_THEN_CODE = "\\boxed{1}\n```python\nprint(1)\n```\n```output\n1\n```\n"


def test_mixed_batch():
    trajs = [
        traj(True, [call("ok")], n_tokens=10, text=CODE_THEN_BOX),
        traj(False, [call("ok"), call("error")], n_tokens=30, finish="length", text=BOX_THEN_CODE),
        traj(True, [], n_tokens=20, text="\\boxed{1}"),
        traj(False, [], n_tokens=40),
    ]
    m = rollout_metrics(trajs)
    assert m["response/n"] == 4
    assert m["reward/mean"] == 0.0
    assert m["acc/mean"] == 0.5
    assert m["tool/code_ratio"] == 0.5
    assert m["tool/calls"] == 3
    assert m["tool/calls_per_response"] == 0.75
    assert m["tool/exec_success"] == pytest.approx(2 / 3)
    assert m["acc/with_code"] == 0.5
    assert m["acc/without_code"] == 0.5
    assert m["acc/n_with_code"] == 2 and m["acc/n_without_code"] == 2
    assert m["tool/pass_rate_correct"] == 1.0  # the correct code response ran cleanly
    assert m["tool/pass_rate_wrong"] == 0.0  # the wrong one had a failing call
    assert m["tool/effective_code_ratio"] == 0.25  # only the first boxed its answer after the output
    assert m["response/length_mean"] == 25.0
    assert m["response/length_max"] == 40.0
    assert m["response/cutoff_rate"] == 0.25


def test_empty_buckets_are_omitted_not_nan():
    m = rollout_metrics([traj(True), traj(False)])
    assert "acc/with_code" not in m and "tool/exec_success" not in m and "tool/pass_rate_correct" not in m
    assert m["acc/n_with_code"] == 0 and m["tool/code_ratio"] == 0.0
    assert m["acc/without_code"] == 0.5
    assert not any(math.isnan(v) for v in m.values())

    m = rollout_metrics([traj(True, [call("timeout")])])
    assert "acc/without_code" not in m
    assert m["tool/exec_success"] == 0.0
    assert m["acc/n_without_code"] == 0


def test_empty_list_and_prefix():
    assert rollout_metrics([], prefix="val/") == {"val/response/n": 0.0}
    m = rollout_metrics([traj(True)], prefix="val/aime24/")
    assert m["val/aime24/acc/mean"] == 1.0
    assert all(k.startswith("val/aime24/") for k in m)


@pytest.mark.parametrize(
    ("calls", "text", "expected"),
    [
        ([call("ok")], CODE_THEN_BOX, True),
        ([call("ok")], BOX_THEN_CODE, False),  # answered before seeing the output
        ([call("error")], CODE_THEN_BOX, False),  # no successful execution
        ([], "\\boxed{1}", False),
        ([call("ok")], "```python\nprint(1)\n```\n```output\n1\n```\n", False),  # no answer at all
    ],
)
def test_effective_code(calls, text, expected):
    assert is_effective_code(traj(True, calls, text=text)) is expected
