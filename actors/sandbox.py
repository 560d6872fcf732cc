"""The sandbox pool: async Ray actors that each own one zygote, and a picklable client that routes snippets to them.

``SandboxPool.create(cfg)`` spawns ``cfg.num_workers`` named ``SandboxWorker`` actors (spread over nodes, each with
``cfg.num_cpus``, restarted by Ray when they die). The pool object itself is a plain client holding the actor handles:
pass it into generator actors and ``await pool.run(code)`` there. Routing is least-loaded (by this client's own
in-flight count) and sticky per session id; at most ``max_queue`` requests in flight per client is the backpressure
(``run`` waits for a slot), and ``stats()`` (every step in the run's metrics, through the generators) shows how full
that budget runs and how long snippets queue. ``create`` logs one loud warning when workers run with partial isolation
(``sandbox.isolation=best`` on a host missing a layer), and ``isolation_metrics()`` gives the level for the run's
metrics. Every failure of the sandbox itself comes back as ``ExecResult(status="sandbox_error")``: a dead
worker fails only the requests that were on it, and Ray restarts it for the next ones.

Not here: isolation and limits (``torl/sandbox/``), turning results into observations (``torl.rollout.tool_protocol``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from collections import Counter
from typing import Any, get_args

import ray

from torl.config import SandboxConfig
from torl.rollout.types import ExecResult, ExecStatus
from torl.sandbox.client import Zygote, sandbox_error
from torl.sandbox.health import PROBES, SandboxUnhealthy, probe_failures
from torl.sandbox.isolation import LEVEL_VALUE, warning

log = logging.getLogger(__name__)
WORKER_BACKOFF_S = 2.0  # how long new requests avoid a worker that failed one (Ray restarts it meanwhile)


class SandboxWorker:
    """One zygote behind an async actor; every method delegates to ``torl.sandbox.client.Zygote``."""

    def __init__(self, cfg: SandboxConfig, rank: int = 0) -> None:
        self._zygote = Zygote(cfg, rank)

    async def ready(self) -> dict[str, Any]:
        """Start the zygote (preloading takes about a second) and report how it isolates snippets."""
        await self._zygote.start()
        return dict(self._zygote.info, restarts=self._zygote.restarts, worker_pid=os.getpid())

    async def run(self, code: str, session: str | None = None) -> ExecResult:
        return await self._zygote.run(code, session)

    async def close_session(self, session: str) -> None:
        await self._zygote.close_session(session)

    async def load(self) -> dict[str, int]:
        return {"waiting": self._zygote.waiting, "running": self._zygote.running}

    async def kill_zygote(self) -> int | None:
        """Kill this worker's zygote process (for tests of recovery); the next request starts a new one."""
        return self._zygote.kill_for_test()

    async def shutdown(self) -> None:
        await self._zygote.close()


class SandboxPool:
    """Client of the sandbox workers; picklable (only the config and the actor handles travel)."""

    def __init__(self, cfg: SandboxConfig, workers: list[Any], isolation: list[dict[str, Any]] | None = None) -> None:
        if not workers:
            raise ValueError("SandboxPool needs at least one worker actor")
        self.cfg = cfg
        self.workers = list(workers)
        self.isolation = list(isolation or [])  # each worker's report (``torl.sandbox.isolation.Report.as_dict``)
        self._reset_local()

    def _reset_local(self) -> None:
        self._inflight = [0] * len(self.workers)
        self._down_until = [0.0] * len(self.workers)  # a worker that just failed is avoided while Ray restarts it
        self._gate: asyncio.Semaphore | None = None
        self._gate_loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0
        self._counts: Counter[str] = Counter()
        self._queue_s = 0.0
        self._wall_s = 0.0
        self._max_queue_s = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "workers": self.workers, "isolation": self.isolation}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cfg, self.workers, self.isolation = state["cfg"], state["workers"], state["isolation"]
        self._reset_local()

    @classmethod
    def create(cls, cfg: SandboxConfig, name: str = "torl_sandbox") -> SandboxPool:
        """Spawn the worker actors (named ``{name}:{i}``), wait until every zygote is up, return the client.

        Raises (Ray wraps it) when ``sandbox.isolation=strict`` and a worker's host lacks a layer: the message names
        what is missing and how to get it."""
        workers = [
            SandboxWorkerActor.options(
                name=f"{name}:{rank}",
                num_cpus=cfg.num_cpus,
                max_restarts=cfg.max_restarts,
                max_task_retries=0,  # a snippet is never re-run behind the caller's back
                max_concurrency=cfg.concurrency_per_worker + cfg.max_queue + 16,
                scheduling_strategy="SPREAD",
            ).remote(cfg, rank)
            for rank in range(cfg.num_workers)
        ]
        infos = ray.get([w.ready.remote() for w in workers])
        log.info("sandbox pool %r up: %s", name, infos)
        reports = [info["isolation"] for info in infos]
        loud = warning(reports)
        if loud:
            log.warning(loud)
        pool = cls(cfg, workers, reports)
        if cfg.probe:
            try:
                pool.probe()
            except SandboxUnhealthy:
                pool.shutdown()
                raise
        return pool

    def probe(self) -> None:
        """Run the known snippets (``torl.sandbox.health.PROBES``) on every worker; raise ``SandboxUnhealthy``
        naming each wrong answer. A worker that cannot answer at all counts as its sandbox failing."""
        refs = [(i, p, self.workers[i].run.remote(p.code)) for i in range(len(self.workers)) for p in PROBES]
        failures = []
        for i, probe, ref in refs:
            try:
                result = ray.get(ref, timeout=self.cfg.timeout_s + 60)
            except Exception as exc:  # noqa: BLE001 - a dead or hung worker: the sandbox's failure, reported below
                result = sandbox_error(f"worker {i} failed: {type(exc).__name__}: {str(exc)[:300]}")
            failures += [f"worker {i}: {line}" for line in probe_failures([(probe, result)])]
        if failures:
            raise SandboxUnhealthy(
                f"the sandbox failed {len(failures)} of {len(refs)} start-up probe snippets (sandbox.probe):\n  "
                + "\n  ".join(failures)
            )

    def _pick(self, session: str | None) -> int:
        if session is not None:  # sticky: every copy of the pool sends a session to the same worker
            return zlib.crc32(session.encode()) % len(self.workers)
        now = time.monotonic()
        return min(range(len(self.workers)), key=lambda i: (self._down_until[i] > now, self._inflight[i]))

    def _gate_here(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate_loop is not loop:
            self._gate, self._gate_loop = asyncio.Semaphore(self.cfg.max_queue), loop
        return self._gate

    async def run(self, code: str, session: str | None = None) -> ExecResult:
        """Run one snippet; never raises for model code or sandbox failures (those give ``sandbox_error``)."""
        t0 = time.monotonic()
        gate = self._gate_here()
        self._waiting += 1
        try:
            await gate.acquire()
        finally:
            self._waiting -= 1
        local_wait = time.monotonic() - t0
        idx = self._pick(session)
        self._inflight[idx] += 1
        try:
            result = await self.workers[idx].run.remote(code, session)
        except Exception as exc:  # noqa: BLE001 - a dead or restarting worker fails this request only
            log.warning("sandbox worker %d failed a request: %s", idx, exc)
            result = sandbox_error(f"worker {idx} failed: {type(exc).__name__}: {str(exc)[:300]}")
            self._down_until[idx] = time.monotonic() + WORKER_BACKOFF_S
        finally:
            self._inflight[idx] -= 1
            gate.release()
        result.queue_s += local_wait
        self._record(result)
        return result

    def _record(self, result: ExecResult) -> None:
        self._counts[result.status] += 1
        self._queue_s += result.queue_s
        self._wall_s += result.wall_s
        self._max_queue_s = max(self._max_queue_s, result.queue_s)

    async def close_session(self, session: str) -> None:
        try:
            await self.workers[self._pick(session)].close_session.remote(session)
        except Exception as exc:  # noqa: BLE001 - the session died with its worker; nothing left to release
            log.warning("closing sandbox session %r failed: %s", session, exc)

    def queue_fill(self) -> float:
        """Fraction (0..1) of this client's request budget in use; at 1 ``run`` makes callers wait for a slot."""
        return min(1.0, (sum(self._inflight) + self._waiting) / self.cfg.max_queue)

    def stats(self) -> dict[str, float]:
        """Flat counters of this client since it was made (or unpickled): results by status, what is in flight and
        waiting now, queueing and execution times (keys and their merge over clients: ``torl.rollout.metrics``)."""
        done = sum(self._counts.values())
        out: dict[str, float] = {f"sandbox/{k}": float(self._counts[k]) for k in get_args(ExecStatus)}
        out.update(
            {
                "sandbox/requests": float(done),
                "sandbox/in_flight": float(sum(self._inflight)),
                "sandbox/waiting": float(self._waiting),
                "sandbox/queue_fill": self.queue_fill(),
                "sandbox/queue_s_mean": self._queue_s / done if done else 0.0,
                "sandbox/queue_s_max": self._max_queue_s,
                "sandbox/exec_s_mean": self._wall_s / done if done else 0.0,
            }
        )
        return out

    def isolation_level(self) -> str:
        """The weakest isolation among the workers at start: "full", "partial" or "none"."""
        return min((r["level"] for r in self.isolation), key=LEVEL_VALUE.__getitem__, default="none")

    def isolation_metrics(self) -> dict[str, float]:
        """``sandbox/isolation`` for the run's metrics: 2 full, 1 partial (see the warning), 0 none."""
        return {"sandbox/isolation": LEVEL_VALUE[self.isolation_level()]}

    def shutdown(self) -> None:
        """Stop the zygotes and kill the worker actors (no restart)."""
        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=10)
        except Exception as exc:  # noqa: BLE001 - best effort: killing the actor also kills its zygote
            log.warning("sandbox shutdown: %s", exc)
        for worker in self.workers:
            ray.kill(worker, no_restart=True)


SandboxWorkerActor = ray.remote(SandboxWorker)
