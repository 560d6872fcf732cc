"""Every rollout metric, declared once: what the trajectories say (``rollout_metrics``) and how the loop ran.

Two sources, no key in both:
- ``rollout_metrics``: ToRL's analysis of a list of graded trajectories (accuracy, reward, code use, execution
  success, lengths), computed once on the driver for a whole batch; training logs it every step and evaluation
  writes one table row per benchmark with it, so the two report the same quantities under the same names.
- ``batch_metrics``: what only a generator sees while it samples (tokens, rounds, preemptions, time waiting on the
  engine or on tools, tool requests that never ran), for its shard of a batch. ``ENGINE_METRICS`` declares each of
  these keys with how the shards combine (``merge_batch_metrics``).
Keys are flat and slash-namespaced.
A ratio whose bucket is empty (accuracy without code when every response used code, execution success when no
call ran) is omitted rather than reported as 0 or NaN; the matching ``.../n_...`` count is always present so a
reader can tell "0 %" from "no data". Not here: grading (torl.grading), pass@k over samples (torl.evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from torl.config import ToolConfig
from torl.rollout import ToolLoop
from torl.types import ExecStatus, Trajectory

# The marker the tool loop inserts before an observation (ToRL: "```output\n{obs}\n```\n").
_OUTPUT_MARK = "```output"
_BOX_MARK = "\\boxed"


def is_effective_code(traj: Trajectory) -> bool:
    """Code that ran successfully *and* came before the final answer (ToRL paper §3.3's "effective code").

    A response counts when at least one call ended with status ok and its last ``\\boxed`` appears after the first
    inserted observation, i.e. the answer was written with the execution result in view rather than before it.
    """
    if not any(c.status == "ok" for c in traj.tool_calls):
        return False
    first_obs = traj.text.find(_OUTPUT_MARK)
    last_box = traj.text.rfind(_BOX_MARK)
    return first_obs >= 0 and last_box > first_obs


def rollout_metrics(trajs: Sequence[Trajectory], prefix: str = "") -> dict[str, float]:
    """Aggregate metrics over ``trajs`` (graded: ``reward`` and ``correct`` set), each key prefixed with ``prefix``.

    Keys: ``reward/mean``, ``acc/mean``, ``acc/with_code``, ``acc/without_code``, ``tool/code_ratio`` (share of
    responses with >= 1 executed call), ``tool/exec_success`` (share of executed calls with status ok),
    ``tool/calls_per_response``, ``tool/effective_code_ratio``, ``tool/pass_rate_correct`` and
    ``tool/pass_rate_wrong`` (share of code-using responses whose every call succeeded, among correct / wrong ones:
    the paper's "pass ratio in correct vs incorrect responses"), ``response/length_mean`` and ``response/length_max``
    (tokens, observations included), ``response/cutoff_rate`` and ``response/eos_rate`` (finish_reason "length" /
    "eos"), and counts ``response/n``, ``acc/n_with_code``, ``acc/n_without_code``, ``tool/calls``,
    ``tool/timeouts``, ``tool/sandbox_errors``.

    >>> rollout_metrics([], prefix="val/")
    {'val/response/n': 0.0}
    """
    n = len(trajs)
    out: dict[str, float] = {"response/n": float(n)}
    if n == 0:
        return {prefix + k: v for k, v in out.items()}

    with_code = [t for t in trajs if t.tool_calls]
    without_code = [t for t in trajs if not t.tool_calls]
    calls = [c for t in trajs for c in t.tool_calls]
    lengths = [len(t.response_ids) for t in trajs]

    out["reward/mean"] = sum(t.reward for t in trajs) / n
    out["acc/mean"] = sum(t.correct for t in trajs) / n
    out["acc/n_with_code"] = float(len(with_code))
    out["acc/n_without_code"] = float(len(without_code))
    if with_code:
        out["acc/with_code"] = sum(t.correct for t in with_code) / len(with_code)
    if without_code:
        out["acc/without_code"] = sum(t.correct for t in without_code) / len(without_code)

    out["tool/code_ratio"] = len(with_code) / n
    out["tool/calls"] = float(len(calls))
    out["tool/calls_per_response"] = len(calls) / n
    if calls:
        out["tool/exec_success"] = sum(c.status == "ok" for c in calls) / len(calls)
    out["tool/effective_code_ratio"] = sum(is_effective_code(t) for t in trajs) / n
    correct_code = [t for t in with_code if t.correct]
    wrong_code = [t for t in with_code if not t.correct]
    if correct_code:
        out["tool/pass_rate_correct"] = sum(t.code_ok for t in correct_code) / len(correct_code)
    if wrong_code:
        out["tool/pass_rate_wrong"] = sum(t.code_ok for t in wrong_code) / len(wrong_code)

    out["tool/timeouts"] = float(sum(c.status == "timeout" for c in calls))
    out["tool/sandbox_errors"] = float(sum(c.status == "sandbox_error" for c in calls))

    out["response/length_mean"] = sum(lengths) / n
    out["response/length_max"] = float(max(lengths))
    out["response/cutoff_rate"] = sum(t.finish_reason == "length" for t in trajs) / n
    out["response/eos_rate"] = sum(t.finish_reason == "eos" for t in trajs) / n
    return {prefix + k: v for k, v in out.items()}


# How a generator's batch metrics combine with the other generators' (and an evaluation's chunks):
# - count: adds up everywhere (over generators sharing a batch and over successive chunks);
# - throughput: adds up over generators decoding side by side, but is not a count (never summed over time);
# - max: the batch waits for its slowest generator; the fullest queue is the one to watch;
# - mean: a per-trajectory or per-call mean, or a level, averaged over generators.
Reduce = Literal["count", "throughput", "max", "mean"]
ENGINE_METRICS: dict[str, Reduce] = {
    "rollout/trajectories": "count",
    "rollout/tokens": "count",  # sampled tokens (loss mask 1)
    "rollout/obs_tokens": "count",  # inserted observation tokens (loss mask 0)
    "rollout/tokens_per_s": "throughput",
    "rollout/rounds_mean": "mean",  # engine rounds per trajectory
    "rollout/preempted": "count",  # engine calls cut by a weight update (continued on the new weights)
    "rollout/policy_version": "mean",  # the generators' weight version when the batch ended
    "time/rollout": "max",
    "time/generate": "mean",  # per trajectory: waiting on the engine
    "time/tool_wait": "mean",  # per trajectory: waiting on tools
    "time/tool_exec": "mean",  # per call: running in the sandbox
    "time/tool_queue": "mean",  # per call: queued for a sandbox worker
    "time/engine_idle_tools": "mean",  # the engine had nothing to decode: every live trajectory waited on a tool
    "tool/requests": "count",  # rounds that ended at the tool stop string
    "tool/unexecuted_requests": "count",  # ... with no complete python block before it (nothing ran)
    "tool/stop_missed": "count",  # responses that wrote the stop string while it never fired
    # Sandbox health, from each generator's pool client (``SandboxPool.stats``), totals since the run started.
    **{f"sandbox/{status}": "count" for status in get_args(ExecStatus)},  # results by status
    "sandbox/requests": "count",
    "sandbox/in_flight": "count",  # at the moment of reading
    "sandbox/waiting": "count",  # callers waiting for a slot of the max_queue budget
    "sandbox/queue_fill": "max",  # share of a client's max_queue budget in use (1: callers wait)
    "sandbox/queue_s_mean": "mean",
    "sandbox/queue_s_max": "max",
    "sandbox/exec_s_mean": "mean",
}


@dataclass
class BatchStats:
    """Counters of one ``generate`` call that trajectories alone do not carry."""

    wall_s: float
    loops: Sequence[ToolLoop] = field(default_factory=list)


def batch_metrics(trajs: Sequence[Trajectory], stats: BatchStats) -> dict[str, float]:
    """A generator's ``ENGINE_METRICS`` for its shard of a batch (the generator adds the policy version and idle)."""
    n = max(len(trajs), 1)
    sampled = sum(sum(t.loss_mask) for t in trajs)
    calls = [c for t in trajs for c in t.tool_calls]
    wall = max(stats.wall_s, 1e-9)
    return {
        "rollout/trajectories": float(len(trajs)),
        "rollout/tokens": float(sampled),
        "rollout/obs_tokens": float(sum(len(t.loss_mask) for t in trajs) - sampled),
        "rollout/tokens_per_s": sampled / wall,
        "rollout/rounds_mean": sum(lp.rounds for lp in stats.loops) / n,
        "rollout/preempted": float(sum(lp.preemptions for lp in stats.loops)),
        "time/rollout": stats.wall_s,
        "time/generate": sum(t.gen_s for t in trajs) / n,
        "time/tool_wait": sum(t.tool_s for t in trajs) / n,
        "time/tool_exec": sum(c.exec_s for c in calls) / max(len(calls), 1),
        "time/tool_queue": sum(c.queue_s for c in calls) / max(len(calls), 1),
        "tool/requests": float(sum(lp.requests for lp in stats.loops)),
        "tool/unexecuted_requests": float(sum(lp.unexecuted for lp in stats.loops)),
        "tool/stop_missed": float(sum(1 for lp in stats.loops if lp.stop_missed)),
    }


def _reduction(key: str) -> Reduce:
    try:
        return ENGINE_METRICS[key]
    except KeyError:
        raise KeyError(f"metric {key!r} is not declared in torl.metrics.ENGINE_METRICS") from None


def merge_batch_metrics(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """One figure per key from the generators' parts (their shards of a batch, or their sandbox clients' stats),
    each key combined as ``ENGINE_METRICS`` declares."""
    merged: dict[str, float] = {}
    for key in {k for m in parts for k in m}:
        values = [m[key] for m in parts if key in m]
        how = _reduction(key)
        if how in ("count", "throughput"):
            merged[key] = sum(values)
        elif how == "max":
            merged[key] = max(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged


def engine_counts(metrics: dict[str, float]) -> dict[str, float]:
    """The counts among a batch's ``metrics``: what an evaluation adds up over its chunks."""
    return {k: v for k, v in metrics.items() if _reduction(k) == "count"}


def tool_warnings(metrics: dict[str, float], tool: ToolConfig) -> list[str]:
    """Loud messages for tools that silently never fire (the most reported failure in peers: veRL #3257, #2986)."""
    if not tool.enabled or metrics.get("rollout/trajectories", 0) == 0:
        return []
    out = []
    requests, unexecuted = metrics["tool/requests"], metrics["tool/unexecuted_requests"]
    if unexecuted > 0 and unexecuted == requests:
        out.append(
            f"tools enabled but none of {int(requests)} tool requests executed: the rounds stopped at "
            f"{tool.stop!r} without a complete ```python block before it"
        )
    if metrics["tool/stop_missed"] > 0:
        out.append(
            f"{int(metrics['tool/stop_missed'])} responses contain {tool.stop!r} but the stop string never fired "
            "(check tool.stop against what the model writes, e.g. spacing or tokenization)"
        )
    return out
