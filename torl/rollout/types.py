"""The records that cross actor boundaries: a sandbox result, one tool call, one trajectory.

Kept small and typed (veRL's rollout record, not slime's catch-all ``Sample``): every per-token list of a
``Trajectory`` has the length of ``response_ids``, checked in one place (``Trajectory.check``). No free-form
metadata dict: a new field comes with a test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ExecStatus = Literal["ok", "error", "timeout", "killed", "sandbox_error"]
FinishReason = Literal["eos", "length", "stop", "abort"]


@dataclass
class ExecResult:
    """What running one snippet produced. The sandbox returns this; it never raises for model code.

    ``status``: ok (exit 0), error (non-zero exit or exception), timeout (wall clock exceeded, process group
    killed), killed (ended by a signal, e.g. segfault or a resource limit), sandbox_error (the sandbox itself
    failed, e.g. its worker died; ``stderr`` says why).
    """

    status: ExecStatus
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    wall_s: float = 0.0  # time the snippet ran
    queue_s: float = 0.0  # time the request waited for a free worker slot
    truncated: bool = False  # stdout or stderr was cut at the output cap

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class ToolCall:
    """One executed tool request inside a trajectory."""

    code: str
    observation: str  # the text inserted into the context (inside the ```output frame)
    status: ExecStatus
    exec_s: float
    queue_s: float
    # Whether the call passed (``torl.rollout.tool_protocol.is_success``: exit status 0, or ToRL's rule under
    # tool.compat_code_ok); None when built without a verdict (older records): the status decides.
    ok: bool | None = None
    error: str = ""  # the sandbox's own message when status is sandbox_error (the health gate names the cause)

    def __post_init__(self) -> None:
        if self.ok is None:
            self.ok = self.status == "ok"


@dataclass
class Trajectory:
    """One sampled response to one prompt, token-exact.

    ``loss_mask[i]`` is 1 for tokens the model sampled and 0 for inserted observation tokens; ``logprobs[i]`` is the
    behaviour log-probability of sampled tokens (0.0 where the mask is 0); ``versions[i]`` is the policy version
    that sampled token i (-1 on inserted tokens), so staleness is exact even if weights changed mid-trajectory.
    """

    problem_id: str
    group: int  # index of the prompt within its batch; the n samples of one prompt share it
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason = "eos"
    text: str = ""  # decoded response, tool outputs included
    answer: str = ""  # the gold answer, carried for grading
    reward: float = 0.0
    correct: bool = False
    gen_s: float = 0.0  # time spent waiting on the engine
    tool_s: float = 0.0  # time spent waiting on tools (queue + execution)
    # ToRL's execution_pass (tool.compat_code_ok): the verdict of the last round that still allowed a call; None =
    # the default verdict, every call passed.
    exec_pass: bool | None = None
    # Rounds with neither a complete code block nor a final answer (SimpleTIR's void turns; algo.filter_void_turns).
    void_turns: int = 0

    def grade_item(self) -> tuple[str, str, bool, bool]:
        """What the grader needs: (response text, gold answer, used code, attempted code failed)."""
        return self.text, self.answer, self.used_code, self.used_code and not self.code_ok

    def check(self) -> None:
        """Assert per-token alignment; called where trajectories are produced and consumed."""
        n = len(self.response_ids)
        if not (len(self.logprobs) == len(self.loss_mask) == len(self.versions) == n):
            raise AssertionError(
                f"trajectory {self.problem_id}: misaligned lengths ids={n} logprobs={len(self.logprobs)} "
                f"mask={len(self.loss_mask)} versions={len(self.versions)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (a checkpoint keeps the rollouts started but not yet trained as these)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        traj = cls(**{**data, "tool_calls": [ToolCall(**c) for c in data.get("tool_calls", [])]})
        traj.check()
        return traj

    @property
    def used_code(self) -> bool:
        return bool(self.tool_calls)

    @property
    def code_ok(self) -> bool:
        """True when code was attempted and every call passed (or, under tool.compat_code_ok, ToRL's verdict)."""
        if self.exec_pass is not None:
            return self.exec_pass
        return bool(self.tool_calls) and all(c.ok for c in self.tool_calls)


class LearnerDied(RuntimeError):
    """A learner rank is gone (killed, OOM, node lost): its shard of the model and optimizer went with it, so the run
    stops, and ``trainer.resume=auto`` continues from the last checkpoint (jobs/train.py says so)."""


class GeneratorDied(RuntimeError):
    """Generator ``index`` is gone (its actor or its vLLM engine process died) mid-call; the training driver
    replaces it. Raised where the index is known but the driver is not (the learner's weight push)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(index, message)  # both in args, so it survives pickling through Ray
        self.index = index
        self.message = message

    def __str__(self) -> str:
        return self.message
