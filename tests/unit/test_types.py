import json

import pytest

from torl.rollout.types import ToolCall, Trajectory


def test_a_trajectory_round_trips_through_json_exactly():
    t = Trajectory(
        "p1", 2, [1, 2], [3, 4, 5], [-0.5, 0.0, -0.25], [1, 0, 1], [3, -1, 4],
        [ToolCall("print(1)", "1", "ok", 0.01, 0.002)], "eos", "abc", "7", 1.0, True, 0.5, 0.25,
    )  # fmt: skip
    back = Trajectory.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t and isinstance(back.tool_calls[0], ToolCall)


def test_a_misaligned_trajectory_is_refused_on_load():
    data = Trajectory("p", 0, [1], [2, 3], [0.0], [1, 1], [0, 0]).to_dict()
    with pytest.raises(AssertionError, match="misaligned"):
        Trajectory.from_dict(data)
