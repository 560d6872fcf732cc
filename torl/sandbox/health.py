"""Sandbox health: the sandbox's own failures told apart from the code's, a gate that stops a run whose sandbox is
failing, and a probe of known snippets that runs before anything depends on the sandbox.

ToRL's sandbox failed silently: its URL was a placeholder, every call came back as "UnknownError", and the model
trained against a broken tool (docs/sandbox-health.md). Here a failure is the sandbox's when the sandbox says so
(status ``sandbox_error``: no worker, a dead or crashed zygote, a child it could not fork, a refused or malformed
request); a NameError, a crash, a timeout or a kill of model code is the code's. Timeouts and kills of *trivial* code
are the sandbox's too, but only the probe knows code is trivial, so the probe judges those.

Not here: running snippets (``actors/sandbox.py``, ``torl/sandbox/``), stopping the run (``jobs/loop.py``).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torl.config import SandboxConfig
from torl.rollout.types import ExecResult, ToolCall


class SandboxUnhealthy(RuntimeError):
    """The sandbox is failing (the probe, or the gate over recent steps); the message names the cause."""


def is_sandbox_side(status: str) -> bool:
    """Whether a result's failure is the sandbox's own rather than the code's (see the module docstring)."""
    return status == "sandbox_error"


def failure_cause(message: str) -> str:
    """The first line of a sandbox failure's message, without the "sandbox: " prefix, cut to 200 characters."""
    line = message.strip().split("\n", 1)[0] if message.strip() else "no message"
    return line.removeprefix("sandbox: ")[:200]


def top_cause(calls: Sequence[ToolCall]) -> str:
    """The most frequent cause among ``calls``' sandbox-side failures, with its count ("" when there are none)."""
    causes = Counter(failure_cause(c.error) for c in calls if is_sandbox_side(c.status))
    if not causes:
        return ""
    cause, n = causes.most_common(1)[0]
    return f"{cause} ({n} of {sum(causes.values())})"


def health_report(calls: Sequence[ToolCall], cfg: SandboxConfig) -> dict[str, float | str]:
    """What evaluation writes to results.json and Serve's /health shows, judged as the training gate judges one
    window: the calls, the sandbox-side failures, their share, the top cause, and the level (ok, warn, failing)."""
    v = HealthGate(1, cfg.health_stop_share, cfg.health_warn_share, cfg.health_min_calls).observe(calls)
    level = {"ok": "ok", "warn": "warn", "stop": "failing"}[v.level]
    return {"level": level, "calls": v.calls, "sandbox_failures": v.failures, "sandbox_failure_share": v.share,
            "cause": v.cause}  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """The gate's reading after a step: ok, warn (share above warn_share) or stop (above stop_share)."""

    level: Literal["ok", "warn", "stop"]
    share: float  # sandbox-side failures / calls over the window
    calls: int
    failures: int
    cause: str
    message: str = ""

    def metrics(self) -> dict[str, float]:
        return {"sandbox/failure_share": self.share, "sandbox/window_failures": float(self.failures)}


@dataclass
class HealthGate:
    """Sandbox-side failures over the last ``window`` steps' tool calls, against two shares.

    A window rather than one step: a worker that dies fails only its in-flight calls and Ray restarts it, so one bad
    step is noise; a sandbox that keeps failing fills the window. Judged only with at least ``min_calls`` calls in the
    window (a model that stopped calling tools says nothing about the sandbox).
    """

    window: int = 5
    stop_share: float = 0.25
    warn_share: float = 0.05
    min_calls: int = 8
    _steps: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.window < 1 or not 0.0 <= self.warn_share <= self.stop_share <= 1.0 or self.min_calls < 1:
            raise ValueError("health gate: window >= 1, 0 <= warn_share <= stop_share <= 1, min_calls >= 1")

    @classmethod
    def from_config(cls, cfg: SandboxConfig) -> HealthGate:
        return cls(cfg.health_window, cfg.health_stop_share, cfg.health_warn_share, cfg.health_min_calls)

    def observe(self, calls: Sequence[ToolCall]) -> Verdict:
        """Add one step's tool calls and judge the window."""
        self._steps.append(list(calls))
        while len(self._steps) > self.window:
            self._steps.popleft()
        seen = [c for step in self._steps for c in step]
        failures = sum(is_sandbox_side(c.status) for c in seen)
        share = failures / len(seen) if seen else 0.0
        cause = top_cause(seen)
        if len(seen) < self.min_calls or share <= self.warn_share:
            return Verdict("ok", share, len(seen), failures, cause)
        level: Literal["warn", "stop"] = "stop" if share > self.stop_share else "warn"
        limit = self.stop_share if level == "stop" else self.warn_share
        message = (
            f"the sandbox failed {failures} of {len(seen)} tool calls over the last {len(self._steps)} steps"
            f" ({share:.0%} > sandbox.health_{level}_share={limit:g}); most common cause: {cause}"
        )
        return Verdict(level, share, len(seen), failures, cause, message)


@dataclass(frozen=True)
class Probe:
    """A known snippet and what a working sandbox answers."""

    code: str
    status: str
    stdout: str | None = None  # exact stdout, or None: not checked
    stderr_has: str = ""


# Trivial, quick snippets covering what training needs: output, the preloaded libraries, silence, the model's own
# error reported as the code's (not the sandbox's).
PROBES: tuple[Probe, ...] = (
    Probe("print(6 * 7)", "ok", "42\n"),
    Probe("import sympy\nprint(sympy.factorint(360))", "ok", "{2: 3, 3: 2, 5: 1}\n"),
    Probe("x = 1", "ok", ""),
    Probe("print(undefined_name)", "error", "", "NameError"),
)


def probe_failures(results: Sequence[tuple[Probe, ExecResult]]) -> list[str]:
    """What went wrong in a probe run, one line per failed snippet (empty: the sandbox works).

    >>> probe_failures([(PROBES[0], ExecResult("timeout", wall_s=10.0))])
    ["print(6 * 7): timeout (trivial code timed out: the sandbox's workers are overloaded or broken)"]
    """
    out = []
    for probe, r in results:
        if r.status == probe.status and (probe.stdout is None or r.stdout == probe.stdout):
            if probe.stderr_has in r.stderr:
                continue
        code = probe.code.replace("\n", "; ")
        if is_sandbox_side(r.status):
            why = failure_cause(r.stderr)
        elif r.status in ("timeout", "killed"):
            why = f"trivial code {'timed out' if r.status == 'timeout' else 'was killed'}: the sandbox's " + (
                "workers are overloaded or broken" if r.status == "timeout" else "limits or setup are wrong"
            )
        else:
            why = f"expected {probe.status} {probe.stdout!r}, got {r.stdout[:80]!r} {failure_cause(r.stderr)!r}"
        out.append(f"{code}: {r.status} ({why})")
    return out
