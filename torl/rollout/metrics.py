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
reader can tell "0 %" from "no data". Not here: grading (torl.rl.grading), pass@k over samples (torl.evaluation).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from torl.config import ToolConfig
from torl.rl.grading import extract_boxed, quick_equivalent
from torl.rollout.tool_loop import ToolLoop
from torl.rollout.types import ExecStatus, Trajectory

# The marker the tool loop inserts before an observation (ToRL: "```output\n{obs}\n```\n").
_OUTPUT_MARK = "```output"
_BOX_MARK = "\\boxed"
# What separates the values a program prints on one line ("x = 5, y = 7", "answer: 12").
_PIECES = re.compile(r"[\s,;:=]+")
_SPACE = re.compile(r"\s+")


def answer_in_output(answer: str | None, output: str) -> bool:
    r"""Whether the final answer ``answer`` can be read off a program's ``output``: it equals (as ``torl.rl.grading``'s
    cheap check decides: the same text after normalisation, or the same number; spaces ignored) the whole output,
    one of its lines, or one value of a line split at spaces, commas, semicolons, colons and ``=``.

    >>> answer_in_output("\\frac{7}{2}", "x = 7/2"), answer_in_output("12", "123")
    (True, False)
    """
    if not answer:
        return False
    candidates = {output} | set(output.splitlines())
    candidates |= {piece for line in output.splitlines() for piece in _PIECES.split(line)}
    answer = _SPACE.sub("", answer)
    return any(quick_equivalent(answer, _SPACE.sub("", c)) is True for c in candidates if c.strip())


def is_effective_code(traj: Trajectory) -> bool:
    r"""Code whose output is used in the answer (ToRL's "effective code", made checkable).

    A response counts when its final answer (the last ``\boxed{}``) comes after the first inserted observation and
    can be read off the output of a call that ended with status ok (``answer_in_output``). Code that ran but whose
    output the answer ignores, code that failed, and answers written before any output do not count.
    """
    first_obs = traj.text.find(_OUTPUT_MARK)
    if first_obs < 0 or traj.text.rfind(_BOX_MARK) < first_obs:
        return False
    answer = extract_boxed(traj.text)
    return any(c.status == "ok" and answer_in_output(answer, c.observation) for c in traj.tool_calls)


def level_name(level: str) -> str:
    """A difficulty level as a metric-key segment: "Level 5" -> "level_5", "hard" -> "hard"."""
    return re.sub(r"[^a-z0-9]+", "_", level.strip().lower()).strip("_")


def recovery_and_budget(trajs: Sequence[Trajectory], max_calls: int = 0) -> dict[str, float]:
    """Error recovery (responses whose first call did not end ok) and how the tool-call budget was spent; see
    ``rollout_metrics`` for the keys."""
    out: dict[str, float] = {}
    first_failed = [t for t in trajs if t.tool_calls and t.tool_calls[0].status != "ok"]
    out["tool/n_first_failed"] = float(len(first_failed))
    if first_failed:
        out["tool/acc_first_failed"] = sum(t.correct for t in first_failed) / len(first_failed)
        out["tool/retry_after_fail"] = sum(len(t.tool_calls) > 1 for t in first_failed) / len(first_failed)
    counts = [len(t.tool_calls) for t in trajs]
    for k in range(max(max(counts, default=0), max_calls) + 1):
        out[f"tool/share_{k}_calls"] = counts.count(k) / max(len(trajs), 1)
    if max_calls > 0 and trajs:
        out["tool/at_budget"] = sum(c >= max_calls for c in counts) / len(trajs)
    return out


def by_level(trajs: Sequence[Trajectory], levels: Mapping[str, str]) -> dict[str, float]:
    """Accuracy and code ratio per difficulty level; responses to problems without a level are left out."""
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        if levels.get(t.problem_id):
            groups[level_name(levels[t.problem_id])].append(t)
    out: dict[str, float] = {}
    for name, ts in sorted(groups.items()):
        out[f"level/{name}/n"] = float(len(ts))
        out[f"level/{name}/acc"] = sum(t.correct for t in ts) / len(ts)
        out[f"level/{name}/code_ratio"] = sum(bool(t.tool_calls) for t in ts) / len(ts)
    return out


def rollout_metrics(
    trajs: Sequence[Trajectory], prefix: str = "", levels: Mapping[str, str] | None = None, max_calls: int = 0
) -> dict[str, float]:
    """Aggregate metrics over ``trajs`` (graded: ``reward`` and ``correct`` set), each key prefixed with ``prefix``.

    Keys: ``reward/mean``, ``acc/mean``, ``acc/with_code``, ``acc/without_code``, ``tool/code_ratio`` (share of
    responses with >= 1 executed call), ``tool/exec_success`` (share of executed calls with status ok),
    ``tool/calls_per_response``, ``tool/effective_code_ratio``, ``tool/void_turn_share`` (responses with a void
    turn), ``tool/pass_rate_correct`` and
    ``tool/pass_rate_wrong`` (share of code-using responses whose every call succeeded, among correct / wrong ones:
    the paper's "pass ratio in correct vs incorrect responses"), ``response/length_mean`` and ``response/length_max``
    (tokens, observations included), ``response/cutoff_rate`` and ``response/eos_rate`` (finish_reason "length" /
    "eos"), and counts ``response/n``, ``acc/n_with_code``, ``acc/n_without_code``, ``tool/calls``,
    ``tool/timeouts``, ``tool/sandbox_errors``.

    Error recovery and budget (``recovery_and_budget``): ``tool/acc_first_failed``, P(correct | the first call did
    not end ok: error, timeout, killed or sandbox error), over ``tool/n_first_failed`` responses;
    ``tool/retry_after_fail``, the share of those that called again; ``tool/share_{k}_calls``, the share of responses
    with exactly k calls (k from 0 to ``max_calls`` or the most seen); ``tool/at_budget``, the share that used all
    ``max_calls`` calls (when ``max_calls`` > 0). Difficulty (``by_level``, when ``levels`` maps problem ids to
    levels such as "hard" or "Level 5"): ``level/{level}/n``, ``level/{level}/acc``, ``level/{level}/code_ratio``.
    ``tool/exec_success`` is ToRL's code pass rate; ``tool/effective_code_ratio`` is taken over code-using responses
    (``is_effective_code``).

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
        out["tool/exec_success"] = sum(bool(c.ok) for c in calls) / len(calls)  # the call's verdict (compat_code_ok)
    if with_code:
        out["tool/effective_code_ratio"] = sum(is_effective_code(t) for t in with_code) / len(with_code)
    correct_code = [t for t in with_code if t.correct]
    wrong_code = [t for t in with_code if not t.correct]
    if correct_code:
        out["tool/pass_rate_correct"] = sum(t.code_ok for t in correct_code) / len(correct_code)
    if wrong_code:
        out["tool/pass_rate_wrong"] = sum(t.code_ok for t in wrong_code) / len(wrong_code)

    out["tool/void_turn_share"] = sum(t.void_turns > 0 for t in trajs) / n  # SimpleTIR's void turns (any round)
    out.update(recovery_and_budget(trajs, max_calls))
    out.update(by_level(trajs, levels or {}))
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
        raise KeyError(f"metric {key!r} is not declared in torl.rollout.metrics.ENGINE_METRICS") from None


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


# ToRL's analyses as (metric key, label, format): the rows of training's end-of-run table (held-out, before and after).
ANALYSIS_FIGURES = [
    ("acc/mean", "accuracy", "{:.3f}"),
    ("tool/code_ratio", "code ratio", "{:.2f}"),
    ("tool/exec_success", "code pass rate", "{:.2f}"),
    ("tool/effective_code_ratio", "effective code ratio", "{:.2f}"),
    ("acc/with_code", "accuracy with code", "{:.3f}"),
    ("acc/without_code", "accuracy without code", "{:.3f}"),
    ("tool/acc_first_failed", "accuracy | first call failed", "{:.3f}"),
    ("tool/n_first_failed", "responses whose first call failed", "{:.0f}"),
    ("tool/calls_per_response", "calls per response", "{:.2f}"),
]


def analysis_figures(metrics: dict[str, float], prefix: str = "") -> list[tuple[str, str, str]]:
    """``ANALYSIS_FIGURES`` under ``prefix``, then accuracy and code ratio for each difficulty level in ``metrics``."""
    out = [(prefix + key, label, fmt) for key, label, fmt in ANALYSIS_FIGURES]
    head = prefix + "level/"
    for name in sorted({k[len(head) :].split("/")[0] for k in metrics if k.startswith(head)}):
        out.append((f"{head}{name}/acc", f"accuracy, level {name}", "{:.3f}"))
        out.append((f"{head}{name}/code_ratio", f"code ratio, level {name}", "{:.2f}"))
    return out
