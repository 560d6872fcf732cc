"""Prompt batches for training: templated, tokenized, length-filtered, shuffled per epoch, resumable.

The order is a pure function of (seed, epoch), so a resumed run that restores ``SamplerState`` draws exactly the
batches an uninterrupted run would. Not here: rollouts, grading (see actors/).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torl.data.problems import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedProblem:
    problem: Problem
    prompt_ids: list[int]


def encode_problems(
    problems: Sequence[Problem],
    render: Callable[[str], str],
    encode: Callable[[str], list[int]],
    max_prompt_tokens: int,
) -> tuple[list[EncodedProblem], int]:
    """Template and tokenize every problem; drop those longer than ``max_prompt_tokens``.

    ToRL drops training prompts longer than ``max_prompt_length - 10`` tokens (rl_dataset.py); the caller passes the
    already-reduced limit. Returns the kept problems and how many were dropped.
    """
    kept: list[EncodedProblem] = []
    for problem in problems:
        ids = encode(render(problem.question))
        if len(ids) <= max_prompt_tokens:
            kept.append(EncodedProblem(problem, ids))
    return kept, len(problems) - len(kept)


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # index of the next problem within this epoch's order


class PromptSampler:
    """Yields batches of ``batch_size`` problems, reshuffled each epoch with ``random.Random(seed + epoch)``.

    A batch never straddles epochs: the tail of an epoch shorter than a batch is skipped (as a drop-last loader
    does), so every step trains on exactly ``batch_size`` prompts.
    """

    def __init__(self, items: Sequence[EncodedProblem], batch_size: int, seed: int, shuffle: bool = True) -> None:
        if len(items) < batch_size:
            raise ValueError(f"only {len(items)} usable training problems, fewer than data.batch_size={batch_size}")
        self.items = list(items)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.state = SamplerState()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.items) // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[EncodedProblem]:
        if self.state.position + self.batch_size > len(self.items):
            self.state = SamplerState(epoch=self.state.epoch + 1, position=0)
        order = self._order(self.state.epoch)
        start = self.state.position
        self.state.position += self.batch_size
        return [self.items[i] for i in order[start : start + self.batch_size]]
