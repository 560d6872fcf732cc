"""LIMR selection: the learning-impact score on a hand-computed example, and the per-problem reward log the training
job writes (aggregation, resume after a checkpoint, torn lines)."""

import json

import pytest

from torl.data.problem_rewards import (
    FILE_NAME,
    ProblemReward,
    load_problem_rewards,
    record_problem_rewards,
    reward_curves,
    step_records,
)
from torl.data.problems import DataError
from torl.prepare.limr import average_curve, lim_score, lim_scores, select
from torl.rollout.types import Trajectory

# Three problems over three epochs: one that learns, one never solved, one always solved.
CURVES = {"learns": [0.0, 0.5, 1.0], "never": [0.0, 0.0, 0.0], "always": [1.0, 1.0, 1.0]}


def test_lim_score_hand_computed():
    # r_avg = [1/3, 1/2, 2/3]; normaliser sum (1 - r_avg)^2 = 4/9 + 1/4 + 1/9 = 29/36.
    assert average_curve(CURVES) == pytest.approx([1 / 3, 1 / 2, 2 / 3])
    scores = lim_scores(CURVES)
    # learns: (1/3)^2 + 0 + (1/3)^2 = 8/36 -> 1 - 8/29 = 21/29.
    assert scores["learns"] == pytest.approx(21 / 29)
    # never: (1/3)^2 + (1/2)^2 + (2/3)^2 = 29/36 -> 0; always: its deviation is the normaliser itself -> 0.
    assert scores["never"] == pytest.approx(0.0)
    assert scores["always"] == pytest.approx(0.0)
    assert select(scores, min_score=0.6) == ["learns"]


def test_following_the_average_exactly_scores_one_and_far_off_scores_negative():
    curves = {"a": [0.2, 0.6], "b": [0.2, 0.6]}
    assert lim_scores(curves) == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    curves = {"up": [0.0, 1.0], "down": [1.0, 0.0], "mid": [0.5, 0.5]}
    scores = lim_scores(curves)  # average [0.5, 0.5]: normaliser 0.5; up and down deviate 0.5 -> 0
    assert scores["mid"] == pytest.approx(1.0) and scores["up"] == pytest.approx(0.0)
    assert lim_score([1.0, 1.0], [0.9, 0.0]) == pytest.approx(0.0)  # always solved: 0 whatever the curve
    assert lim_score([0.0, 1.0], [0.9, 0.0]) < 0  # further from the curve than an always-solved problem


def test_short_curves_are_scored_on_their_own_points_or_left_out():
    curves = {"long": [0.0, 0.5, 1.0], "short": [0.0]}
    assert average_curve(curves) == pytest.approx([0.0, 0.5, 1.0])
    assert set(lim_scores(curves, min_points=2)) == {"long"}
    assert lim_scores(curves, min_points=1)["short"] == pytest.approx(1.0)  # 0 at k=1 is exactly the average
    assert lim_score([1.0], [1.0, 0.5]) == 0.0  # everything solved at its points: no learning signal
    with pytest.raises(ValueError):
        lim_score([0.1, 0.2, 0.3], [0.1])


def test_select_orders_by_score_and_caps():
    scores = {"a": 0.9, "b": 0.7, "c": 0.95, "d": 0.1, "e": 0.7}
    assert select(scores, 0.6) == ["c", "a", "b", "e"]  # ties by id
    assert select(scores, 0.6, max_keep=2) == ["c", "a"]
    assert select(scores, 0.99) == []


def traj(pid: str, correct: bool) -> Trajectory:
    return Trajectory(problem_id=pid, group=0, prompt_ids=[1], reward=1.0 if correct else -1.0, correct=correct)


def batch(step: int) -> list[Trajectory]:
    """Two problems x 4 samples; p1 gets one more sample right each step, p2 never."""
    return [traj("ds/p1", i < step) for i in range(4)] + [traj("ds/p2", False) for _ in range(4)]


def test_step_records_aggregate_samples_per_problem():
    (p1, p2) = step_records(3, batch(3))
    assert p1 == ProblemReward(3, "ds/p1", 4, 3, 0.5) and p1.accuracy == 0.75
    assert p2 == ProblemReward(3, "ds/p2", 4, 0, -1.0)


def test_reward_file_grows_per_step_and_gives_curves(tmp_path):
    for step in (1, 2, 3):
        record_problem_rewards(tmp_path, step, batch(step))
    records = load_problem_rewards(tmp_path)
    assert [r.step for r in records] == [1, 1, 2, 2, 3, 3]
    assert reward_curves(records) == {"ds/p1": [0.25, 0.5, 0.75], "ds/p2": [0.0, 0.0, 0.0]}


def test_resume_redoes_steps_after_the_checkpoint_without_duplicates(tmp_path):
    for step in (1, 2, 3, 4):
        record_problem_rewards(tmp_path, step, batch(step))
    # The run died after step 4 but its last checkpoint is step 2: the resumed run trains steps 3 and 4 again.
    record_problem_rewards(tmp_path, 3, [traj("ds/p1", True)] * 4)
    records = load_problem_rewards(tmp_path / FILE_NAME)
    assert [(r.step, r.problem_id) for r in records] == [
        (1, "ds/p1"),
        (1, "ds/p2"),
        (2, "ds/p1"),
        (2, "ds/p2"),
        (3, "ds/p1"),
    ]
    assert records[-1].correct == 4  # the resumed run's figures, not the lost ones
    record_problem_rewards(tmp_path, 4, batch(4))
    assert reward_curves(load_problem_rewards(tmp_path))["ds/p1"] == [0.25, 0.5, 1.0, 1.0]


def test_a_torn_last_line_is_cut_before_the_next_write_and_ignored_when_reading(tmp_path):
    record_problem_rewards(tmp_path, 1, batch(1))
    path = tmp_path / FILE_NAME
    with open(path, "a") as f:
        f.write('{"step": 2, "problem_id": "ds/p1", "sam')  # killed mid-write
    assert len(load_problem_rewards(path)) == 2
    record_problem_rewards(tmp_path, 2, batch(2))
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["problem_id"] for line in lines)


def test_bad_or_missing_reward_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no per-problem reward file"):
        load_problem_rewards(tmp_path)
    (tmp_path / FILE_NAME).write_text('{"step": 1}\n')
    with pytest.raises(DataError, match=rf"{FILE_NAME}:1: not a per-problem reward record"):
        load_problem_rewards(tmp_path)
