"""Token-budget micro-batching: which sequences each rank trains on, in which micro-batch, packed without padding.

``plan_micro_batches`` balances sequences over ranks by token count, then packs each rank's share into micro-batches
of at most ``budget`` tokens (first-fit decreasing; a longer sequence gets a micro-batch of its own). Every rank gets
the SAME number of micro-batches (empty ones where needed) because FSDP's collectives run once per forward/backward
on every rank. ``pack`` concatenates a micro-batch into one row with per-sequence position ids, which Hugging Face
models turn into a block-diagonal attention mask (no padding, no cross-sequence attention).

The plan is deterministic (ties broken by index), so every rank computes the same plan from the same batch.
Not here: the loss (``torl/rl/grpo.py``) or the model (``actors/learner.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def balance(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split sequence indices over ``world_size`` ranks, longest first to the least-loaded rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], len(shards[r]), r))
        shards[rank].append(i)
        loads[rank] += lengths[i]
    return [sorted(s) for s in shards]


def pack_by_budget(indices: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bins of at most ``budget`` tokens; a sequence longer than the budget sits alone."""
    if budget < 1:
        raise ValueError(f"micro-batch token budget must be >= 1, got {budget}")
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(indices, key=lambda j: (-lengths[j], j)):
        for b, used in enumerate(fill):
            if used + lengths[i] <= budget:
                bins[b].append(i)
                fill[b] += lengths[i]
                break
        else:
            bins.append([i])
            fill.append(lengths[i])
    return [sorted(b) for b in bins]


def _split_to(bins: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """Split the largest multi-sequence bins until there are ``count`` bins; pad with empty bins if impossible."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.extend([] for _ in range(count - len(bins)))
            break
        big = max(splittable, key=lambda b: (sum(lengths[i] for i in b), -b[0]))
        bins.remove(big)
        half = len(big) // 2
        bins.extend([big[:half], big[half:]])
    return bins


def plan_micro_batches(lengths: Sequence[int], world_size: int, budget: int) -> list[list[list[int]]]:
    """``plan[rank][k]`` = indices of the sequences rank trains on in its k-th micro-batch (may be empty).

    >>> plan_micro_batches([5, 3, 4, 2], world_size=2, budget=6)
    [[[0], [3]], [[2], [1]]]
    """
    shards = balance(lengths, world_size)
    per_rank = [pack_by_budget(s, lengths, budget) for s in shards]
    count = max(len(b) for b in per_rank)
    return [_split_to(b, lengths, count) for b in per_rank]


def pack(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row holding the sequences back to back: ``input_ids`` [1, L] and ``position_ids`` [1, L] (restarting at 0).

    Every sequence must be non-empty: a packed row infers sequence boundaries from where positions restart.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack needs at least one sequence and no empty sequence")
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long).unsqueeze(0)  # [1, L]
    pos = torch.cat([torch.arange(len(s)) for s in sequences]).unsqueeze(0)  # [1, L]
    return ids, pos


def pack_responses(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pack`` of (prompt, response) pairs, plus ``keep`` [N]: the row positions whose next token is a response
    token, in order (position ``keep[i]`` predicts ``input_ids[0, keep[i] + 1]``), so the log-probs come out flat
    over the response tokens like every other ``[N]`` tensor of the loss.

    Every prompt must be non-empty: the first response token needs a position before it. An empty response keeps
    no position.

    >>> pack_responses([([5, 6], [7]), ([8], [9, 10])])[2]
    tensor([1, 3, 4])
    """
    if any(not p for p, _ in pairs):
        raise ValueError("pack_responses needs a non-empty prompt in every pair")
    ids, pos = pack([list(p) + list(r) for p, r in pairs])  # [1, L], [1, L]
    keep, offset = [], 0
    for p, r in pairs:
        keep.append(torch.arange(offset + len(p) - 1, offset + len(p) + len(r) - 1))
        offset += len(p) + len(r)
    return ids, pos, torch.cat(keep)  # [1, L], [1, L], [N]
