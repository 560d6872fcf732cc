"""The health gate and the start-up probe against a sandbox broken on purpose, and against a model writing failing
code into a working one (torl.sandbox.health; the gate's arithmetic is in tests/unit/test_sandbox_health.py).

Broken two ways: every worker actor killed mid-run (each call then fails in the pool client), and a zygote that
cannot fork (its user's process limit leaves no room for a snippet's child, so the forker's fork fails with EAGAIN).
"""

import asyncio
import os
import shutil
from dataclasses import replace

import pytest
from sandbox_envs import ALONE_UID, ENVS, EnvZygote

from torl.config import SandboxConfig
from torl.rollout.types import ExecResult, ToolCall
from torl.sandbox.health import PROBES, HealthGate, SandboxUnhealthy, probe_failures

CFG = SandboxConfig(num_workers=2, concurrency_per_worker=2, timeout_s=2.0, uid_base=262000, num_cpus=0.1)
# What a model that writes failing code sends: its own NameError, a crash, an infinite loop (a real timeout).
MODEL_CODE = ["print(a)", "raise ValueError('no')", "import sys\nsys.exit(3)", "while True: pass", "print(7)"] + [
    "print(undefined)"
] * 3


def as_call(code: str, r: ExecResult) -> ToolCall:
    return ToolCall(code, "", r.status, r.wall_s, r.queue_s, error=r.stderr if r.status == "sandbox_error" else "")


def test_gate_stops_a_run_whose_workers_are_killed_but_not_a_model_writing_failing_code(ray_cluster):
    ray = ray_cluster
    from actors.sandbox import SandboxPool

    pool = SandboxPool.create(CFG, name="healthtest")  # the probe passes: the sandbox works
    gate = HealthGate(window=3, stop_share=0.25, warn_share=0.05, min_calls=8)

    async def step() -> list[ToolCall]:
        results = await asyncio.gather(*(pool.run(code) for code in MODEL_CODE))
        return [as_call(c, r) for c, r in zip(MODEL_CODE, results, strict=True)]

    try:
        for _ in range(2):
            calls = asyncio.run(step())
            assert {c.status for c in calls} >= {"error", "timeout", "ok"}
            assert gate.observe(calls).level == "ok"  # the model's failures are its own
        for worker in pool.workers:
            ray.kill(worker, no_restart=True)
        levels = []
        for _ in range(CFG.health_window):
            verdict = gate.observe(asyncio.run(step()))
            levels.append(verdict.level)
            if verdict.level == "stop":
                break
        assert levels[-1] == "stop" and len(levels) <= gate.window, levels
        assert "worker" in verdict.cause and "failed" in verdict.cause, verdict.cause
        with pytest.raises(SandboxUnhealthy, match="start-up probe"):
            pool.probe()  # what a fresh start would have said
    finally:
        pool.shutdown()


class NoForkZygote(EnvZygote):
    """A zygote run as an unprivileged user allowed two processes: itself and its forker, no snippet child."""

    def command(self) -> list[str]:
        return ["prlimit", "--nproc=2", "--", *super().command()]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("prlimit"), reason="needs root (setpriv) and prlimit")
def test_probe_and_gate_catch_a_zygote_that_cannot_fork():
    async def go():
        alone = replace(ENVS["non-root"], uid=ALONE_UID)  # the process limit is per uid, machine-wide
        zygote = NoForkZygote(SandboxConfig(isolation="best", timeout_s=2.0, uid_base=263000), alone)
        try:
            probes = [(p, await zygote.run(p.code)) for p in PROBES]
            steps = [[as_call(c, await zygote.run(c)) for c in MODEL_CODE] for _ in range(3)]
        finally:
            await zygote.close()
        return probes, steps

    probes, steps = asyncio.run(go())
    failures = probe_failures(probes)
    assert len(failures) == len(PROBES) and all("setup failed" in f and "BlockingIOError" in f for f in failures)
    gate = HealthGate(window=3, stop_share=0.25, warn_share=0.05, min_calls=8)
    verdict = gate.observe(steps[0])  # every call failed in the sandbox: the first step decides
    assert verdict.level == "stop" and "BlockingIOError" in verdict.cause
