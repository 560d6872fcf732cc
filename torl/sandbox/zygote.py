"""The zygote: a warm, clean Python process forking one isolated child per snippet (docs/platform-notes.md §7, §10).

Started by ``torl.sandbox.client.Zygote`` as ``python -E -s -c ...zygote.main(...)`` with a minimal environment (no
RAY_*, no API keys, no VLLM vars), it first sets up the isolation layers the host allows (``torl.sandbox.layers``;
under ``sandbox.isolation=strict`` it refuses to start without all of them), preloads sympy/numpy once and then
serves newline-delimited JSON requests on stdin, answering on stdout. Each snippet runs in a forked child, born in
its slot's PID namespace, that enters a new session, joins its slot's network namespace (no network) and mount
namespace (a private /tmp), takes the slot's Landlock rules, gets rlimits, drops to an unprivileged uid of its own,
installs the seccomp filter, chdirs into a private scratch directory and ``exec``s the code as ``__main__`` (a
script, like ToRL's Sandbox Fusion: the last expression is not echoed). The zygote enforces the wall timeout and the
output cap and kills whatever the snippet left behind: its process group, and, because the zygote is a child
subreaper, any orphan that escaped into a new session.

Persistent sessions keep one long-lived child per session id that runs successive snippets in the same globals.

Standard library only (plus ``torl.sandbox.child``): the zygote must stay small, quick to fork, and free of Ray.
Not here: request routing, Ray, the ExecResult record (see ``torl.sandbox.client`` and ``actors/sandbox.py``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import json
import os
import resource
import selectors
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from torl.sandbox import landlock_rules
from torl.sandbox.child import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    SETUP_FAILED,
    ChildSetup,
    Limits,
    check,
    libc,
    session_child,
    stateless_child,
)
from torl.sandbox.isolation import IsolationUnavailable
from torl.sandbox.layers import Layers, set_up
from torl.sandbox.namespaces import SlotNamespaces, hidden_prefixes, make_slot_namespaces

# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested).


class CappedBuffer:
    """Collects bytes up to ``cap``; reports overflow so the caller can kill the writer instead of reading on."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def append(self, data: bytes) -> bool:
        """Add ``data``; return True once more than ``cap`` bytes were offered (the excess is dropped)."""
        room = self.cap - self.size
        if len(data) > room:
            data = data[: max(room, 0)]
            self.truncated = True
        if data:
            self.parts.append(data)
            self.size += len(data)
        return self.truncated

    def text(self) -> str:
        # Binary output must not break the JSON reply: undecodable bytes become U+FFFD.
        return b"".join(self.parts).decode("utf-8", errors="replace")


def classify(wait_status: int | None, timed_out: bool, over_output: bool, stderr: str = "") -> tuple[str, int | None]:
    """Map how a snippet ended to ``(status, exit_code)``; a signal gives a negative exit code like ``subprocess``.

    >>> classify(0, False, False)
    ('ok', 0)
    >>> classify(9, True, False)
    ('timeout', -9)
    """
    code: int | None = None
    if wait_status is not None:
        code = os.waitstatus_to_exitcode(wait_status)
    if timed_out:
        return "timeout", code
    if over_output:
        return "killed", code
    if code is None:
        return "killed", None
    if code < 0:
        return "killed", code
    if code == 125 and stderr.startswith(SETUP_FAILED):
        return "sandbox_error", code
    return ("ok" if code == 0 else "error"), code


# ---------------------------------------------------------------------------------------------------------------
# Zygote side: the request loop.


@dataclass
class Job:
    """One snippet being run (in a fresh child, or in a session's child)."""

    rid: Any
    pid: int
    out: CappedBuffer
    err: CappedBuffer
    started: float
    deadline: float
    session: Session | None = None
    out_fd: int = -1
    err_fd: int = -1
    slot: int = -1
    wait_status: int | None = None
    timed_out: bool = False
    over_output: bool = False


@dataclass
class Session:
    """A long-lived child holding one interpreter state (persistent-session mode)."""

    sid: str
    pid: int
    ctrl_fd: int
    done_fd: int
    out_fd: int
    err_fd: int
    slot: int
    last_used: float
    job: Job | None = None
    pending: bytes = b""


class Zygote:
    def __init__(self, limits: Limits, proto_in: int, proto_out: int, layers: Layers) -> None:
        self.limits = limits
        self.layers = layers
        self.proto_in, self.proto_out = proto_in, proto_out
        self.sel = selectors.DefaultSelector()
        self.jobs: dict[int, Job] = {}  # stateless jobs by child pid
        self.sessions: dict[str, Session] = {}
        self.inbuf = b""
        self.free_slots: list[int] = []  # slot i = uid uid_base+i with scratch dir <root>/i, reused between jobs
        self.num_slots = 0
        self.slot_ns: dict[int, SlotNamespaces] = {}  # slot -> its namespaces, if the host allows them
        self.slot_setup: dict[int, ChildSetup] = {}  # slot -> how its children isolate themselves
        self.root = os.path.realpath(os.path.join(limits.scratch_root, f"torl-sandbox-{os.getpid()}"))
        _remove_stale_roots(limits.scratch_root)
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        os.chmod(self.root, 0o711)
        self.privileged = layers.identity == "uid"  # snippets get uids of their own
        # Two pools on one machine (training beside evaluation or serving) would otherwise hand out the same uids,
        # and snippets of one could signal the other's processes.
        self.uid_base, self._uid_lock = limits.uid_base, None
        if self.privileged:
            self.uid_base, self._uid_lock = claim_uid_block(limits.uid_base, limits.uid_block)
        self.hidden = hidden_prefixes([sys.base_prefix, sys.prefix]) if self.privileged else []
        self.namespaces = layers.pid_home is not None  # network, mount and PID namespaces per slot
        if self.hidden and not self.namespaces:
            sys.stderr.write(
                f"[zygote] snippets run as uid {self.uid_base}+ and cannot read the Python installation under "
                f"{self.hidden[0][0]} (not world-readable), and no mount namespace is available to re-expose it: "
                "only preloaded modules will import. Use a Python outside that directory or allow namespaces "
                '(README.md, "Sandbox isolation").\n'
            )
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of snippets become our children, so we can kill them
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.wake_r = wake_r
        os.set_blocking(proto_in, False)
        self.sel.register(proto_in, selectors.EVENT_READ, ("proto", None))
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", None))

    # -- requests ----------------------------------------------------------------------------------------------

    def reply(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        os.set_blocking(self.proto_out, True)
        view = memoryview(data)
        while view:
            view = view[os.write(self.proto_out, view) :]

    def handle(self, msg: dict[str, Any]) -> None:
        op, rid = msg.get("op"), msg.get("id")
        if op == "run":
            timeout = float(msg.get("timeout") or self.limits.timeout_s)
            if msg.get("session"):
                self.run_in_session(rid, str(msg["session"]), msg["code"], timeout)
            else:
                self.run_stateless(rid, msg["code"], timeout)
        elif op == "close":
            sess = self.sessions.get(str(msg.get("session")))
            if sess is not None:
                self.end_session(sess)
            self.reply({"id": rid, "status": "ok"})
        elif op == "ping":
            self.reply(
                {
                    "id": rid,
                    "status": "ok",
                    "pid": os.getpid(),
                    "isolation": self.layers.report.as_dict(),
                    "jobs": len(self.jobs),
                    "sessions": len(self.sessions),
                }
            )
        else:
            self.reply({"id": rid, "status": "sandbox_error", "stderr": f"unknown op {op!r}"})

    def _new_child_io(self) -> tuple[int, ChildSetup, tuple[int, int], tuple[int, int]]:
        """A free slot, its child setup (with the write ends of fresh stdout/stderr pipes), and those pipes.

        Slots (uid + scratch dir + namespaces + Landlock rules) are reused: creating and deleting a directory per
        snippet cost ~5 ms on a busy ext4 disk, emptying an already empty one costs one scandir; joining a slot's
        namespaces is cheaper than creating them per snippet (``make_slot_namespaces``).
        """
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            slot = self.num_slots
            if self.privileged and slot >= self.limits.uid_block:
                raise RuntimeError(
                    f"{slot} snippets or sessions at once on one sandbox worker: its uid block holds "
                    f"{self.limits.uid_block}; close sessions or add sandbox workers"
                )
            path = os.path.join(self.root, str(slot))
            os.mkdir(path, 0o700)
            if self.privileged:
                os.chown(path, self.uid_base + slot, self.uid_base + slot)
            self.slot_setup[slot] = self._slot_setup(slot, path)
            self.num_slots += 1
        out_w, err_w = os.pipe(), os.pipe()
        setup = dataclasses.replace(self.slot_setup[slot], out_fd=out_w[1], err_fd=err_w[1])
        return slot, setup, out_w, err_w

    def _slot_setup(self, slot: int, path: str) -> ChildSetup:
        """Build what a new slot's children need: its namespaces and Landlock rules, its uid and limits."""
        layers, namespaces = self.layers, ()
        if self.namespaces:
            ns = self.slot_ns[slot] = make_slot_namespaces(path, self.hidden)
            namespaces = ((ns.net_fd, CLONE_NEWNET), (ns.mnt_fd, CLONE_NEWNS))
        paths = layers.landlock_paths
        return ChildSetup(
            self.limits,
            path,
            out_fd=-1,
            err_fd=-1,
            namespaces=namespaces,
            uid=self.uid_base + slot if self.privileged else None,
            nested_userns=layers.identity == "userns",
            nproc=layers.nproc,
            landlock=landlock_rules.slot_ruleset(path, list(paths)) if paths is not None else None,
            seccomp=layers.seccomp,
        )

    def _fork(self, slot: int) -> int:
        """``os.fork()``, the child born in the slot's PID namespace when it has one (see ``namespaces``)."""
        ns = self.slot_ns.get(slot)
        if ns is None:
            return os.fork()
        check(libc.setns(ns.pid_fd, CLONE_NEWPID), "setns(slot PID namespace)")
        try:
            pid = os.fork()
        except BaseException:
            self.layers.pid_home.join()
            raise
        if pid:
            self.layers.pid_home.join()  # later forks (helpers, other slots) start from home again
        return pid

    def _kill_slot_leftovers(self, slot: int) -> None:
        """Kill what a snippet left in its slot's PID namespace (orphans go to the slot's init, not to us)."""
        ns = self.slot_ns.get(slot)
        if ns is not None:
            for pid in _descendants(ns.init_pid):
                _kill(pid)

    def _watch(self, fd: int, kind: str, owner: Any) -> None:
        os.set_blocking(fd, False)
        self.sel.register(fd, selectors.EVENT_READ, (kind, owner))

    def run_stateless(self, rid: Any, code: str, timeout: float) -> None:
        slot, setup, (out_r, out_w), (err_r, err_w) = self._new_child_io()
        now = time.monotonic()
        pid = self._fork(slot)
        if pid == 0:
            stateless_child(code, setup)
        os.close(out_w)
        os.close(err_w)
        cap = self.limits.max_output_bytes
        job = Job(
            rid,
            pid,
            CappedBuffer(cap),
            CappedBuffer(cap),
            now,
            now + timeout,
            out_fd=out_r,
            err_fd=err_r,
            slot=slot,
        )
        self.jobs[pid] = job
        self._watch(out_r, "out", job)
        self._watch(err_r, "err", job)

    def run_in_session(self, rid: Any, sid: str, code: str, timeout: float) -> None:
        sess = self.sessions.get(sid) or self.start_session(sid)
        if sess.job is not None:
            self.reply(
                {"id": rid, "status": "sandbox_error", "stderr": f"session {sid!r} is already running a snippet"}
            )
            return
        now = time.monotonic()
        cap = self.limits.max_output_bytes
        sess.job = Job(rid, sess.pid, CappedBuffer(cap), CappedBuffer(cap), now, now + timeout, session=sess)
        sess.last_used = now
        os.set_blocking(sess.ctrl_fd, True)
        try:
            os.write(sess.ctrl_fd, (json.dumps({"code": code}) + "\n").encode())
        except OSError as exc:  # the session died between snippets; the reaper reports it
            sess.job.err.append(f"[sandbox] session process is gone: {exc}\n".encode())

    def start_session(self, sid: str) -> Session:
        slot, setup, (out_r, out_w), (err_r, err_w) = self._new_child_io()
        ctrl_r, ctrl_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = self._fork(slot)
        if pid == 0:
            session_child(ctrl_r, done_w, setup)
        for fd in (out_w, err_w, ctrl_r, done_w):
            os.close(fd)
        sess = Session(sid, pid, ctrl_w, done_r, out_r, err_r, slot, time.monotonic())
        self.sessions[sid] = sess
        self._watch(out_r, "out", sess)
        self._watch(err_r, "err", sess)
        self._watch(done_r, "done", sess)
        return sess

    # -- events ------------------------------------------------------------------------------------------------

    def on_output(self, kind: str, owner: Job | Session, fd: int) -> None:
        job = owner.job if isinstance(owner, Session) else owner
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(fd)
            return
        if job is None:  # output of a session between snippets (a stray thread): nobody asked for it
            return
        if (job.out if kind == "out" else job.err).append(data) and not job.over_output:
            job.over_output = True  # a snippet printing gigabytes costs one cap's worth of reading, then dies
            self.finish(job)

    def on_done(self, sess: Session) -> None:
        try:
            data = os.read(sess.done_fd, 4096)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(sess.done_fd)
            return
        sess.pending += data
        while b"\n" in sess.pending:
            line, sess.pending = sess.pending.split(b"\n", 1)
            if sess.job is not None:
                sess.job.wait_status = (json.loads(line)["exit"] & 0xFF) << 8  # as if the process exited with it
                self.finish(sess.job)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            job = self.jobs.get(pid)
            if job is not None:
                job.wait_status = status
                self.finish(job)
                continue
            for sess in list(self.sessions.values()):
                if sess.pid == pid:
                    if sess.job is not None:
                        sess.job.wait_status = status
                        self.finish(sess.job)
                    self.end_session(sess)
        self.kill_orphans()

    def kill_orphans(self) -> None:
        """Kill every child we did not fork ourselves: as subreaper we inherit what snippets left running."""
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as f:
                kids = [int(p) for p in f.read().split()]
        except OSError:
            return
        known = set(self.jobs) | {s.pid for s in self.sessions.values()}
        if self.layers.pid_home is not None:
            known.add(self.layers.pid_home.init_pid)
        for pid in kids:
            if pid not in known:
                _kill(pid)

    def check_deadlines(self, now: float) -> float | None:
        nearest = None
        for job in [*self.jobs.values(), *(s.job for s in self.sessions.values() if s.job)]:
            if now >= job.deadline:
                job.timed_out = True
                self.finish(job)
            elif nearest is None or job.deadline < nearest:
                nearest = job.deadline
        idle = self.limits.session_idle_s
        for sess in list(self.sessions.values()):
            if sess.job is None and now - sess.last_used > idle:
                self.end_session(sess)
        return nearest

    # -- completion --------------------------------------------------------------------------------------------

    def _drain(self, fd: int, buf: CappedBuffer) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                return
            if not data or buf.append(data):
                return

    def finish(self, job: Job) -> None:
        """Kill what the snippet left behind, collect its output and answer the request."""
        sess = job.session
        now = time.monotonic()
        if sess is None:
            _kill_group(job.pid)
            self._kill_slot_leftovers(job.slot)
            self.jobs.pop(job.pid, None)
            out_fd, err_fd = job.out_fd, job.err_fd
        else:
            sess.job = None
            sess.last_used = now
            out_fd, err_fd = sess.out_fd, sess.err_fd
            if job.timed_out or job.over_output:
                self.end_session(sess)
            else:
                for pid in _descendants(sess.pid):  # background processes must not outlive the snippet
                    _kill(pid)
                self._kill_slot_leftovers(sess.slot)
        self._drain(out_fd, job.out)
        self._drain(err_fd, job.err)
        if sess is None:
            for fd in (out_fd, err_fd):
                self._close(fd)
            self._cleanup_slot(job.slot)
        if job.wait_status is None and (job.timed_out or job.over_output):
            job.wait_status = signal.SIGKILL  # killed by us; the zombie is reaped later
        stderr = job.err.text()
        status, code = classify(job.wait_status, job.timed_out, job.over_output, stderr)
        if job.over_output:
            stderr += f"\n[sandbox] output exceeded {self.limits.max_output_bytes} bytes; the process was killed\n"
        elif job.timed_out:
            stderr += f"\n[sandbox] timed out after {job.deadline - job.started:.1f} s\n"
        self.reply(
            {
                "id": job.rid,
                "status": status,
                "stdout": job.out.text(),
                "stderr": stderr,
                "exit_code": code,
                "wall_s": now - job.started,
                "truncated": job.out.truncated or job.err.truncated,
            }
        )
        self.kill_orphans()

    def end_session(self, sess: Session) -> None:
        self.sessions.pop(sess.sid, None)
        _kill_group(sess.pid)
        for pid in _descendants(sess.pid):
            _kill(pid)
        self._kill_slot_leftovers(sess.slot)
        if sess.job is not None:
            job, sess.job = sess.job, None
            job.session = None
            job.wait_status = job.wait_status if job.wait_status is not None else signal.SIGKILL
            job.out_fd, job.err_fd = sess.out_fd, sess.err_fd
            self._drain(sess.out_fd, job.out)
            self._drain(sess.err_fd, job.err)
            status, code = classify(job.wait_status, job.timed_out, job.over_output)
            self.reply(
                {
                    "id": job.rid,
                    "status": status,
                    "stdout": job.out.text(),
                    "stderr": job.err.text() + "\n[sandbox] the session ended; its state is lost\n",
                    "exit_code": code,
                    "wall_s": time.monotonic() - job.started,
                    "truncated": job.out.truncated,
                }
            )
        for fd in (sess.out_fd, sess.err_fd, sess.done_fd, sess.ctrl_fd):
            self._close(fd)
        self._cleanup_slot(sess.slot)

    def _close(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        try:
            os.close(fd)
        except OSError:
            pass

    def _cleanup_slot(self, slot: int) -> None:
        """Empty the slot's scratch directory (what the snippet wrote, even under /tmp) and free the slot."""
        path = os.path.join(self.root, str(slot))
        try:
            entries = list(os.scandir(path))
        except OSError:
            entries = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
        try:
            os.chmod(path, 0o700)  # the snippet may have opened up its directory
        except OSError:
            pass
        self.free_slots.append(slot)

    # -- loop --------------------------------------------------------------------------------------------------

    def serve(self) -> None:
        self.reply(
            {
                "id": None,
                "status": "ready",
                "pid": os.getpid(),
                "isolation": self.layers.report.as_dict(),
                "uid_base": self.uid_base,
                "uid_block": self.limits.uid_block,
            }
        )
        while True:
            nearest = self.check_deadlines(time.monotonic())
            timeout = None if nearest is None else max(0.0, nearest - time.monotonic())
            if self.sessions:
                timeout = min(timeout if timeout is not None else 5.0, 5.0)  # idle expiry
            for key, _ in self.sel.select(timeout):
                kind, owner = key.data
                if kind == "proto":
                    if not self.read_requests():
                        return
                elif kind == "wake":
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self.reap()
                elif not self._still_watched(key):
                    # Handling an earlier event of this batch closed this fd and a new job's pipe reused the number:
                    # reading now would hand the new job's output to the finished one (lost output, seen as an
                    # empty stdout about 3 times in 1000 at 32 concurrent snippets). The new job's own event comes
                    # with the next select.
                    continue
                elif kind == "done":
                    self.on_done(owner)
                else:
                    self.on_output(kind, owner, key.fd)

    def _still_watched(self, key: selectors.SelectorKey) -> bool:
        """Whether ``key``'s fd is still registered for the same owner as when select() reported it."""
        current = self.sel.get_map().get(key.fd)
        return current is not None and current.data is key.data

    def read_requests(self) -> bool:
        try:
            data = os.read(self.proto_in, 1 << 20)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.inbuf += data
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                msg: Any = None
                try:
                    msg = json.loads(line)
                    self.handle(msg)
                except Exception as exc:  # noqa: BLE001 - a bad request (or a failed fork) must not take us down
                    # Answer with the request's id: a reply the client cannot match would leave its caller waiting.
                    rid = msg.get("id") if isinstance(msg, dict) else None
                    self.reply({"id": rid, "status": "sandbox_error", "stderr": f"sandbox: {exc!r}"})
        return True

    def shutdown(self) -> None:
        for sess in list(self.sessions.values()):
            self.end_session(sess)
        for job in list(self.jobs.values()):
            _kill_group(job.pid)
        self.kill_orphans()
        shutil.rmtree(self.root, ignore_errors=True)


UID_LOCK_DIR = "/tmp/torl-uid-locks"  # machine-wide; not "torl-sandbox-*", which _remove_stale_roots sweeps


def claim_uid_block(preferred: int, size: int, tries: int = 256) -> tuple[int, int]:
    """Hold a uid block no other live zygote on this machine holds: ``(base, fd)``; the lock dies with the fd.

    The preferred block (``sandbox.uid_base`` + 1000 x rank) is taken when free, else the next free one above it.
    """
    os.makedirs(UID_LOCK_DIR, mode=0o700, exist_ok=True)
    for k in range(tries):
        base = preferred + k * size
        fd = os.open(os.path.join(UID_LOCK_DIR, f"{base}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return base, fd
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError(f"no free sandbox uid block among {tries} from uid {preferred}: too many sandbox workers here")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_stale_roots(parent: str) -> None:
    """Delete scratch roots of zygotes that were SIGKILLed (they could not clean up after themselves)."""
    try:
        names = [n for n in os.listdir(parent) if n.removeprefix("torl-sandbox-").isdigit()]
    except OSError:
        return
    for name in names:
        pid = name.removeprefix("torl-sandbox-")
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"torl.sandbox.zygote" in f.read():
                    continue  # a live zygote owns it
        except (OSError, ValueError):
            pass
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (any thread may have forked), found via /proc/<pid>/task/*/children."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _warm(preload: list[str]) -> None:
    """Import the preloaded modules and run a little of sympy so its caches and lazy imports are paid once, here."""
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module only costs snippets speed
            sys.stderr.write(f"[zygote] could not preload {name}: {exc!r}\n")
    if "sympy" in sys.modules:
        sympy = sys.modules["sympy"]
        x = sympy.Symbol("x")
        sympy.factorint(123456)
        sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
        sympy.solve(x**2 - 2, x)
        sympy.Rational(1, 3) + sympy.sqrt(2)
    if "numpy" in sys.modules:
        np = sys.modules["numpy"]
        np.linalg.solve(np.eye(3), np.ones(3))


def main(argv: list[str]) -> int:
    limits = Limits.from_json(argv[1] if len(argv) > 1 else "")
    # Keep the protocol on private fds; fd 0/1 become /dev/null and stderr so nothing stray corrupts the protocol.
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    # Each slot holds a few fds (its namespaces, its Landlock ruleset); a zygote with hundreds of sessions needs more
    # than the usual soft limit of 1024. Snippets get their own, small limit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    try:
        layers = set_up(limits)  # first: it may enter a user namespace, which needs a single thread
    except IsolationUnavailable as exc:
        os.write(proto_out, (json.dumps({"id": None, "status": "refused", "stderr": str(exc)}) + "\n").encode())
        return 3
    # Die with the worker that started us (set after set_up: entering a user namespace clears it).
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _warm(limits.preload)
    zygote = Zygote(limits, proto_in, proto_out, layers)
    try:
        zygote.serve()
    finally:
        zygote.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
