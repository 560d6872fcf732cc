"""Token-budget micro-batch planning and packing."""

import random

import pytest
import torch

from torl.rl.batching import balance, pack, pack_by_budget, pack_responses, plan_micro_batches


def _lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(1, 300) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_balance_covers_every_index_once_and_balances_load(world):
    lengths = _lengths(40)
    shards = balance(lengths, world)
    assert sorted(i for s in shards for i in s) == list(range(40))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(lengths)


def test_pack_by_budget_respects_budget():
    lengths = _lengths(30, seed=1) + [500]  # one sequence over the budget
    bins = pack_by_budget(range(len(lengths)), lengths, budget=400)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 400 or len(b) == 1
    assert [30] in bins
    # first-fit decreasing should be close to the lower bound on the bin count
    assert len(bins) <= sum(lengths) // 400 + 3
    with pytest.raises(ValueError):
        pack_by_budget([0], [3], budget=0)


@pytest.mark.parametrize("world,budget", [(1, 64), (2, 64), (2, 10_000), (4, 100)])
def test_plan_gives_every_rank_the_same_number_of_micro_batches(world, budget):
    lengths = _lengths(13, seed=2)
    plan = plan_micro_batches(lengths, world, budget)
    assert len(plan) == world
    assert len({len(p) for p in plan}) == 1
    assert sorted(i for p in plan for mb in p for i in mb) == list(range(13))
    assert plan == plan_micro_batches(lengths, world, budget)  # deterministic: every rank computes the same plan


def test_plan_pads_with_empty_micro_batches_when_a_rank_cannot_split():
    plan = plan_micro_batches([100, 10, 10, 10, 10], world_size=2, budget=15)
    counts = [len(p) for p in plan]
    assert counts[0] == counts[1]
    assert [] in plan[0] or [] in plan[1]


def test_pack_positions_restart_per_sequence():
    ids, pos = pack([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert pos.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert ids.dtype == torch.long
    with pytest.raises(ValueError):
        pack([[1], []])


def test_pack_responses_keeps_the_positions_that_predict_response_tokens():
    ids, pos, keep = pack_responses([([5, 6], [7, 8]), ([9], []), ([10, 11, 12], [13])])
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 0, 1, 2, 3]]
    assert ids[0, keep + 1].tolist() == [7, 8, 13]  # the response tokens, flat and in order
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_responses([([], [1, 2])])
