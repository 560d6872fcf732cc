"""Asyncio client of one zygote process: start it clean, send snippets, turn replies into ``ExecResult``.

The zygote is started as a plain subprocess with a minimal environment built here from scratch (nothing of the
caller's environment is passed on: no RAY_* addresses, no WANDB_API_KEY, no VLLM settings), so it never holds a
Ray connection or a secret that a snippet could reach (docs/platform-notes.md §10). If the zygote dies, the requests in
flight return ``status="sandbox_error"`` and the next request starts a new zygote.

Not here: Ray (``actors/sandbox.py`` wraps this in an actor), isolation itself (``torl.sandbox.child``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from torl.config import SandboxConfig
from torl.rollout.types import ExecResult

log = logging.getLogger(__name__)

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
UIDS_PER_WORKER = 1000  # uid range of worker `rank`: uid_base + rank * 1000 + slot
ZYGOTE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",  # one thread per snippet: numpy must not spawn a BLAS pool per fork
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    # Every snippet forks the zygote, and fork + exit costs CPU per page of its private memory (about 60 MB once
    # sympy and numpy are loaded). Transparent huge pages on glibc's malloc heaps put part of it in 2 MB pages: fork +
    # a small sympy snippet + exit fell from 3.55 to 2.90 ms of CPU, a factorint+solve snippet did not get slower.
    # (Also moving Python's small objects to glibc malloc, PYTHONMALLOC=malloc, gave 2.35 ms but made sympy snippets
    # up to 20 % slower under load.) Where THP is off or glibc is older than 2.35 this changes nothing.
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


def zygote_limits(cfg: SandboxConfig, rank: int = 0) -> dict[str, Any]:
    """The limits JSON the zygote is started with (see ``torl.sandbox.child.Limits``)."""
    return {
        "timeout_s": cfg.timeout_s,
        "memory_mb": cfg.memory_mb,
        "cpu_s": cfg.cpu_s,
        "max_output_bytes": cfg.max_output_bytes,
        "max_processes": cfg.max_processes,
        "max_open_files": cfg.max_open_files,
        "max_file_mb": cfg.max_file_mb,
        "scratch_mb": cfg.scratch_mb,
        "preload": list(cfg.preload),
        "isolation": cfg.isolation,
        "uid_base": cfg.uid_base + rank * UIDS_PER_WORKER,
        "uid_block": UIDS_PER_WORKER,
        "session_idle_s": cfg.session_idle_s,
        "scratch_root": cfg.scratch_root,
    }


def zygote_command(cfg: SandboxConfig, rank: int = 0) -> list[str]:
    """argv of the zygote: this interpreter in isolated mode and the limits JSON.

    ``-I``: no PYTHON* variables, no user site, and, above all, not the working directory first on the import path
    (with ``-c`` it would be: a ``selectors.py`` planted in a shared directory would run as the zygote, root
    included). The project root is appended, after the standard library."""
    boot = (
        f"import sys; sys.path.append({PROJECT_ROOT!r}); import torl.sandbox.zygote as z; sys.exit(z.main(sys.argv))"
    )
    return [sys.executable, "-I", "-c", boot, json.dumps(zygote_limits(cfg, rank))]


def result_from_reply(reply: dict[str, Any], queue_s: float = 0.0) -> ExecResult:
    """Build an ``ExecResult`` from a zygote reply; a malformed reply is a sandbox error, not an exception."""
    status = reply.get("status")
    if status not in ("ok", "error", "timeout", "killed", "sandbox_error"):
        return ExecResult(
            status="sandbox_error", stderr=f"sandbox: malformed reply {str(reply)[:200]}", queue_s=queue_s
        )
    return ExecResult(
        status=status,
        stdout=str(reply.get("stdout", "")),
        stderr=str(reply.get("stderr", "")),
        exit_code=reply.get("exit_code"),
        wall_s=float(reply.get("wall_s", 0.0)),
        queue_s=queue_s,
        truncated=bool(reply.get("truncated", False)),
    )


def sandbox_error(message: str, queue_s: float = 0.0) -> ExecResult:
    return ExecResult(status="sandbox_error", stderr=f"sandbox: {message}", queue_s=queue_s)


class Zygote:
    """One zygote process and the requests in flight to it. Create, then ``await start()`` (or let ``run`` do it)."""

    def __init__(self, cfg: SandboxConfig, rank: int = 0) -> None:
        self.cfg = cfg
        self.rank = rank
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self.restarts = -1  # the first start is not a restart
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._start_lock: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._session_locks: dict[str, asyncio.Lock] = {}
        self.waiting = 0  # requests waiting for a slot
        self.running = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self._reader is not None

    async def start(self) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
            self._slots = asyncio.Semaphore(self.cfg.concurrency_per_worker)
        async with self._start_lock:
            if self.alive:
                return
            self.restarts += 1
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=ZYGOTE_ENV,  # HOME: the zygote sets its own private scratch root
                cwd="/",
                limit=1 << 24,  # one reply holds up to 2 x max_output_bytes, JSON-escaped
            )
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=120)
            if not line:
                code = await self.proc.wait()
                self.proc = None
                raise RuntimeError(f"sandbox zygote exited with code {code} before it was ready (see its stderr)")
            info = json.loads(line)
            if info.get("status") == "refused":  # sandbox.isolation=strict on a host without every layer
                await self.proc.wait()
                self.proc = None
                raise RuntimeError(info["stderr"])
            self.info = info
            self._reader = asyncio.get_running_loop().create_task(self._read_replies(self.proc))
            log.info("sandbox zygote %s ready (rank %d): %s", self.info.get("pid"), self.rank, self.info)

    def command(self) -> list[str]:
        """The zygote's argv (tests wrap it to start the zygote as another user or under a seccomp profile)."""
        return zygote_command(self.cfg, self.rank)

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            try:
                reply = json.loads(line)
            except ValueError:
                log.error("sandbox zygote sent a malformed line: %r", line[:200])
                continue
            fut = self._pending.pop(reply.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
        code = await proc.wait()
        # A clean exit with nothing pending is a shutdown; anything else is worth a warning.
        level = logging.INFO if code == 0 and not self._pending else logging.WARNING
        log.log(level, "sandbox zygote %s exited with code %s; %d requests fail", proc.pid, code, len(self._pending))
        if self.proc is proc:
            self._reader = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result({"status": "sandbox_error", "stderr": f"sandbox: the zygote died (exit code {code})"})
        self._pending.clear()

    async def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        if not self.alive:
            await self.start()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.proc.stdin.write((json.dumps(dict(msg, id=rid)) + "\n").encode())
        try:
            await self.proc.stdin.drain()
        except (ConnectionError, BrokenPipeError) as exc:
            self._pending.pop(rid, None)
            return {"status": "sandbox_error", "stderr": f"sandbox: cannot reach the zygote: {exc}"}
        return await fut

    async def run(self, code: str, session: str | None = None, timeout_s: float | None = None) -> ExecResult:
        """Run ``code`` (stateless, or in ``session``'s interpreter); never raises for anything the snippet does."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        t0 = time.monotonic()
        try:
            if self._slots is None or not self.alive:
                await self.start()
            lock = self._session_locks.setdefault(session, asyncio.Lock()) if session else None
            self.waiting += 1
            try:
                if lock is not None:
                    await lock.acquire()
                await self._slots.acquire()
            finally:
                self.waiting -= 1
            queue_s = time.monotonic() - t0
            self.running += 1
            try:
                msg = {"op": "run", "code": code, "session": session, "timeout": timeout_s or self.cfg.timeout_s}
                reply = await self._request(msg)
            finally:
                self.running -= 1
                self._slots.release()
                if lock is not None:
                    lock.release()
            return result_from_reply(reply, queue_s)
        except Exception as exc:  # noqa: BLE001 - the contract: sandbox failures are results, never exceptions
            log.exception("sandbox request failed")
            return sandbox_error(f"{type(exc).__name__}: {exc}", time.monotonic() - t0)

    async def close_session(self, session: str) -> None:
        self._session_locks.pop(session, None)
        if self.alive:
            await self._request({"op": "close", "session": session})

    async def ping(self) -> dict[str, Any]:
        return await self._request({"op": "ping"})

    async def close(self) -> None:
        """Stop the zygote (it kills its children and removes its scratch root on stdin EOF)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout=5)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def kill_for_test(self) -> int | None:
        """SIGKILL the zygote (tests use it to check that in-flight requests fail cleanly and a new one starts)."""
        if self.proc is None:
            return None
        pid = self.proc.pid
        os.kill(pid, 9)
        return pid
