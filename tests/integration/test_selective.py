"""Training teaches selective tool use: with a price per tool call, a short run of the selective preset must raise
the code ratio on hard items and keep it from rising on easy ones.

The preset's base model (configs/base_model_selective.yaml, shipped in models/torl-selective-base) writes code in
about 40% of its sampled answers to hard items and 20% to easy ones, and answers easy items correctly without code.
With ``reward.tool_call_cost`` a program answer earns less than a direct one, so the best policy calls the tool only
where a direct answer is usually wrong. The assertion is on the training batches' code ratio per difficulty level
(``level/{easy,hard}/code_ratio``, sampled as RL samples them), first five steps against the last five: it separates
only when the price reaches the reward (without it the code ratio rises on easy items too: docs/selective.md), the
sampled tokens are trained (masks) and better responses are made more likely (advantages). The held-out greedy
accuracy must rise as well. Measured figures and the deliberate breaks that fail this test: docs/selective.md.
"""

import statistics

import pytest
from preset_runs import assert_shipped_model_is_current, run_preset

STEPS = 20
MIN_HARD_GAIN = 0.15  # code ratio on hard items, training batches, steps 16-20 against 1-5: +0.21 to +0.29
# ... and on easy items: with the price +0.03 / +0.04 / +0.11 over three seeds, without it +0.27 / +0.33 / +0.22
MAX_EASY_GAIN = 0.15
MIN_ACC_GAIN = 0.3  # held-out greedy accuracy


def test_shipped_selective_base_model_is_intact_and_current():
    assert_shipped_model_is_current("torl-selective-base", "configs/base_model_selective.yaml")


# The suite's longest test: 72 s alone and 190 s beside the other xdist worker on a fast evening of this 2-core
# machine kind, 262 s and then 368 s (over the suite's 360 s) on slower ones, 445 s and 475 s on the slowest day seen
# (194 s alone; docs/testing.md "Where the CPU goes"). Twice the slowest seen.
@pytest.mark.timeout(950)
def test_a_short_run_learns_to_call_the_tool_where_it_pays(ray_cluster, tmp_path):
    rows = run_preset("tiny_selective.yaml", tmp_path / "run", STEPS, "trainer.val_samples=1", "data.val_limit=48")

    def gain(level: str) -> float:
        def mean(steps: range) -> float:
            return statistics.mean(rows[s][f"level/{level}/code_ratio"] for s in steps)

        return mean(range(STEPS - 4, STEPS + 1)) - mean(range(1, 6))

    hard, easy = gain("hard"), gain("easy")
    assert hard >= MIN_HARD_GAIN, (hard, easy)
    assert easy <= MAX_EASY_GAIN, (hard, easy)
    accuracy = [rows[s]["val/acc/mean"] for s in (0, STEPS)]
    assert accuracy[1] - accuracy[0] >= MIN_ACC_GAIN, accuracy
    # the sampled held-out pass ran and split by level (trainer.val_samples)
    assert {"val_sampled/level/easy/code_ratio", "val_sampled/level/hard/code_ratio"} <= rows[STEPS].keys()
