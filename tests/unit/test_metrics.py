"""rollout_metrics: ToRL's analysis metrics on hand-built trajectories."""

import math

import pytest

from torl.rollout.metrics import answer_in_output, is_effective_code, level_name, rollout_metrics
from torl.rollout.types import ToolCall, Trajectory


def call(status: str = "ok", observation: str = "1") -> ToolCall:
    return ToolCall(code="print(1)", observation=observation, status=status, exec_s=0.01, queue_s=0.0)


def traj(
    correct: bool, calls: list[ToolCall] = (), n_tokens: int = 10, finish: str = "eos", text: str = "", pid: str = "p"
):
    return Trajectory(
        problem_id=pid,
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
    assert m["tool/effective_code_ratio"] == 0.5  # of the two code responses, only the first boxed after the output
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


def test_effective_code_needs_the_answer_in_a_successful_output():
    answer_7 = "```python\nprint(7)\n```\n```output\n7\n```\nSo \\boxed{7}"
    assert is_effective_code(traj(True, [call("ok", "7")], text=answer_7))
    assert not is_effective_code(traj(True, [call("ok", "8")], text=answer_7))  # output ran, answer ignores it
    assert not is_effective_code(traj(True, [call("error", "7")], text=answer_7))  # the call that shows it failed
    # a failed first call, then a fix whose output is the answer
    assert is_effective_code(traj(True, [call("error", "NameError: x"), call("ok", "7")], text=answer_7))


@pytest.mark.parametrize(
    ("answer", "output", "expected"),
    [
        ("7", "7", True),
        ("\\frac{7}{2}", "x = 7/2", True),  # a value of the line, equal as a number
        ("(3,4)", "(3, 4)", True),  # the whole line, equal after normalisation
        ("12", "123", False),  # a substring is not a value
        ("12", "a: 5, b: 12", True),
        ("5", "NameError: name 'x' is not defined", False),
        ("", "", False),
        (None, "7", False),
    ],
)
def test_answer_in_output(answer, output, expected):
    assert answer_in_output(answer, output) is expected


def test_recovery_after_a_failed_first_call():
    trajs = [
        traj(True, [call("error"), call("ok")]),  # failed, called again, right
        traj(False, [call("error")]),  # failed, guessed wrong
        traj(False, [call("timeout"), call("ok")]),  # a timeout is a failure too
        traj(True, [call("ok"), call("error")]),  # the FIRST call decides: this one did not fail first
        traj(True, []),
    ]
    m = rollout_metrics(trajs, max_calls=2)
    assert m["tool/n_first_failed"] == 3
    assert m["tool/acc_first_failed"] == pytest.approx(1 / 3)
    assert m["tool/retry_after_fail"] == pytest.approx(2 / 3)
    assert (m["tool/share_0_calls"], m["tool/share_1_calls"], m["tool/share_2_calls"]) == (0.2, 0.2, 0.6)
    assert m["tool/at_budget"] == 0.6
    m = rollout_metrics([traj(True), traj(False, [call("ok")])])  # no failed first call, budget unknown
    assert m["tool/n_first_failed"] == 0 and "tool/acc_first_failed" not in m and "tool/at_budget" not in m
    assert m["tool/share_0_calls"] == 0.5 and m["tool/share_1_calls"] == 0.5 and "tool/share_2_calls" not in m


def test_by_level():
    trajs = [
        traj(True, [call()], pid="a"),
        traj(False, [], pid="a"),
        traj(True, [], pid="b"),
        traj(True, [call()], pid="c"),  # no level: left out of the level figures only
    ]
    m = rollout_metrics(trajs, prefix="val/", levels={"a": "Level 5", "b": "easy", "c": ""})
    assert m["val/level/level_5/n"] == 2 and m["val/level/level_5/acc"] == 0.5
    assert m["val/level/level_5/code_ratio"] == 0.5
    assert (m["val/level/easy/n"], m["val/level/easy/acc"], m["val/level/easy/code_ratio"]) == (1, 1.0, 0.0)
    assert not any(k.startswith("val/level/") for k in rollout_metrics(trajs, prefix="val/"))
    assert level_name(" Level 5 ") == "level_5" and level_name("hard") == "hard"
