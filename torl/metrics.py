"""ToRL's analysis metrics over a list of trajectories: accuracy, reward, code use, execution success, lengths.

One function, ``rollout_metrics``, shared by training (logged every step) and evaluation (one table row per
benchmark), so the two report the same quantities under the same names. Keys are flat and slash-namespaced.
A ratio whose bucket is empty (accuracy without code when every response used code, execution success when no
call ran) is omitted rather than reported as 0 or NaN; the matching ``.../n_...`` count is always present so a
reader can tell "0 %" from "no data". Not here: grading (torl.grading), pass@k over samples (torl.evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

from torl.types import Trajectory

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
    (tokens, observations included), ``response/cutoff_rate`` (finish_reason "length"), and counts
    ``response/n``, ``acc/n_with_code``, ``acc/n_without_code``, ``tool/calls``.

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

    out["response/length_mean"] = sum(lengths) / n
    out["response/length_max"] = float(max(lengths))
    out["response/cutoff_rate"] = sum(t.finish_reason == "length" for t in trajs) / n
    return {prefix + k: v for k, v in out.items()}
