"""Per-request sampling overrides: what a serving request (or a benchmark) may change about one trajectory's sampling.

Training and evaluation sample with the config's ``rollout.*`` settings; a served request brings its own temperature,
budget and stop strings. They travel as one frozen record rather than a free dict, so a misspelled key fails where it
is written instead of being silently ignored by the engine (``SamplingOverrides.from_dict``).

Not here: turning these into vLLM's ``SamplingParams`` (``actors/engine.py``), OpenAI request validation
(``torl.serving.openai_api``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingOverrides:
    """Sampling of one trajectory; ``None`` keeps the config's value (``rollout.temperature``, ...)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # base seed; each round still derives its own (``torl.rollout.tool_loop.derive_seed``)
    max_tokens: int | None = None  # response budget, observations included (None: rollout.max_response_tokens)
    greedy: bool = False
    # Stream text deltas; False: the engine reports each round once, which is cheaper.
    stream: bool = True
    # Ask the engine for each sampled token's logprob; False (serving): none requested, the trajectory holds 0.0.
    logprobs: bool = True
    # Client stop strings: generation ends at the first one (finish reason "stop"), beside the loop's tool stop.
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> SamplingOverrides:
        """From a plain mapping (a Ray caller, a test); unknown keys are an error that lists the known ones."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling overrides {unknown}; known: {sorted(known)}")
        return cls(**values)
