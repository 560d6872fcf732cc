"""The sandbox health gate, the probe's verdicts and the shared report (torl.sandbox.health), on hand-made results.

The same gate runs against a really broken sandbox (killed workers, a zygote that cannot fork) in
tests/integration/test_sandbox_health_gate.py.
"""

import pytest

from torl.config import ConfigError, SandboxConfig
from torl.rollout.types import ExecResult, ToolCall
from torl.sandbox.health import PROBES, HealthGate, health_report, is_sandbox_side, probe_failures

NAME_ERROR = "Traceback (most recent call last):\nNameError: name 'a' is not defined"


def call(status: str, error: str = "") -> ToolCall:
    return ToolCall("print(a)", "x", status, 0.01, 0.0, error=error)


def model_fails(n: int = 8) -> list[ToolCall]:
    """A step whose model writes failing code: errors, a timeout, a kill; no sandbox failure."""
    return [call("error")] * (n - 3) + [call("timeout"), call("killed"), call("ok")]


def sandbox_fails(n: int = 8, why: str = "sandbox: worker 0 failed: ActorDiedError: the actor died") -> list[ToolCall]:
    return [call("sandbox_error", why)] * n


def test_only_sandbox_errors_are_the_sandboxs():
    assert is_sandbox_side("sandbox_error")
    assert not any(is_sandbox_side(s) for s in ("ok", "error", "timeout", "killed"))


def test_a_model_writing_failing_code_never_stops_the_run():
    gate = HealthGate(window=5, stop_share=0.25, warn_share=0.05, min_calls=8)
    assert {gate.observe(model_fails()).level for _ in range(50)} == {"ok"}


def test_a_sandbox_that_breaks_mid_run_stops_it_within_the_window():
    gate = HealthGate(window=5, stop_share=0.25, warn_share=0.05, min_calls=8)
    for _ in range(10):
        assert gate.observe(model_fails()).level == "ok"
    levels = [gate.observe(sandbox_fails()).level for _ in range(5)]
    # 8 of 40 (20%): warn; 16 of 40 (40%): stop, in the second broken step, well inside the window of 5.
    assert levels[:2] == ["warn", "stop"]
    v = gate.observe(sandbox_fails())
    assert v.level == "stop" and "worker 0 failed: ActorDiedError" in v.message and "(40 of 40)" in v.cause


def test_torls_silent_failure_stops_at_the_first_step():
    """ToRL's sandbox answered UnknownError to 61.7% of its calls: one step of that is enough."""
    gate = HealthGate(window=5, stop_share=0.25, warn_share=0.05, min_calls=8)
    step = sandbox_fails(62, "sandbox: cannot reach the zygote: [Errno 111] Connection refused") + model_fails(38)
    v = gate.observe(step)
    assert v.level == "stop" and v.share == pytest.approx(0.62) and "cannot reach the zygote" in v.cause


def test_few_calls_are_not_judged_and_an_old_outage_leaves_the_window():
    gate = HealthGate(window=2, stop_share=0.25, warn_share=0.05, min_calls=8)
    assert gate.observe(sandbox_fails(3)).level == "ok"  # 3 calls: too few to say
    assert gate.observe(sandbox_fails(2) + model_fails(8)).level == "stop"  # 5 of 13
    assert gate.observe(model_fails(8)).level == "warn"  # 2 of 16
    assert gate.observe(model_fails(8)).level == "ok"  # the outage left the window


def test_gate_thresholds_are_checked():
    with pytest.raises(ValueError):
        HealthGate(window=0)
    with pytest.raises(ValueError):
        HealthGate(stop_share=0.1, warn_share=0.2)
    with pytest.raises(ConfigError):
        SandboxConfig(health_warn_share=0.5, health_stop_share=0.2)


def working_answers() -> list[ExecResult]:
    return [
        ExecResult("ok", "42\n", "", 0),
        ExecResult("ok", "{2: 3, 3: 2, 5: 1}\n", "", 0),
        ExecResult("ok", "", "", 0),
        ExecResult("error", "", NAME_ERROR.replace("'a'", "'undefined_name'"), 1),
    ]


def test_probe_passes_a_working_sandbox():
    assert probe_failures(list(zip(PROBES, working_answers(), strict=True))) == []


@pytest.mark.parametrize(
    "index, result, says",
    [
        (0, ExecResult("sandbox_error", stderr="sandbox: setup failed: BlockingIOError(11, 'EAGAIN')"), "BlockingIO"),
        (0, ExecResult("timeout", wall_s=10.0), "trivial code timed out"),
        (2, ExecResult("killed", exit_code=-9), "trivial code was killed"),
        (1, ExecResult("error", "", "ModuleNotFoundError: No module named 'sympy'", 1), "ModuleNotFoundError"),
        (0, ExecResult("ok", "41\n", "", 0), "expected ok '42\\n'"),
        (3, ExecResult("ok", "", "", 0), "expected error"),  # the model's own error must come back as an error
        (3, ExecResult("error", "", "PermissionError: [Errno 1] Operation not permitted", 1), "PermissionError"),
    ],
)
def test_probe_names_what_went_wrong(index, result, says):
    answers = working_answers()
    answers[index] = result
    (failure,) = probe_failures(list(zip(PROBES, answers, strict=True)))
    assert failure.startswith(PROBES[index].code.split("\n")[0]) and says in failure


def test_health_report_judges_as_the_gate():
    cfg = SandboxConfig()
    assert health_report(model_fails(20), cfg)["level"] == "ok"
    report = health_report(sandbox_fails(10) + model_fails(10), cfg)
    assert report["level"] == "failing" and report["sandbox_failures"] == 10 and report["calls"] == 20
    assert report["sandbox_failure_share"] == 0.5 and "ActorDiedError" in report["cause"]
    assert health_report([], cfg)["level"] == "ok"
