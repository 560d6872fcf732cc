"""The forker: the zygote's clean half, which forks each snippet's child and owns every process a snippet makes.

The zygote process (``torl.sandbox.zygote``) reads requests and collects output; that is other trajectories' code
and text, and a child forked from it would inherit a copy (found by walking ``gc.get_objects()`` or scanning the
heap). So the zygote forks this process once, warm (sympy and numpy loaded) and before it reads any request, and
asks it over a socket to start, stop, continue and end processes. The forker never sees a snippet's code or output:
it gets pipe fds (``SCM_RIGHTS``) and job numbers, so a child forked from it holds nothing of anyone.

What it does: slots (a uid, namespaces, a directory) handed out one per running snippet or live session; the
child, forked straight into its slot's PID namespace; reaping, with the exit status sent back; killing what a
snippet leaves (its process group, its slot's PID namespace, orphans it inherits as child subreaper); stopping a
session's process between calls (SIGSTOP: no thread of it runs while the zygote thinks it idle) and continuing it;
fresh on-disk scratch per snippet where there is no mount namespace, removed when it ends.

Protocol, one JSON object per datagram on a SOCK_SEQPACKET pair. Zygote to forker: ``spawn`` (with the fds:
stdout, stderr, code in, status out, and for a session done out), ``end``, ``pause``, ``resume``; forker to zygote:
``ready``, then ``exit`` (a status, or the ``error`` that kept the child from starting). Standard library only.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import signal
import socket
from dataclasses import dataclass
from typing import Any

from torl.sandbox import landlock_rules, scratch
from torl.sandbox.child import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    ChildSetup,
    Limits,
    check,
    libc,
    session_child,
    stateless_child,
)
from torl.sandbox.layers import Layers
from torl.sandbox.namespaces import PidHome, SlotNamespaces, enter_pid_home, make_slot_namespaces

MAX_FDS = 5  # stdout, stderr, code, status, done


@dataclass
class Proc:
    """One snippet's (or session's) process, as the forker knows it."""

    job: int
    pid: int
    slot: int
    scratch: str | None  # its on-disk scratch, where it has no tmpfs of its own
    ended: bool = False  # the zygote is done with it: no exit report wanted


class Forker:
    """Started by ``run`` in the process the zygote forks; serves until the zygote closes the socket."""

    def __init__(self, limits: Limits, layers: Layers, sock: socket.socket, root: str, uid_base: int,
                 hidden: list[tuple[str, str]]) -> None:  # fmt: skip
        self.limits, self.layers, self.sock, self.root, self.hidden = limits, layers, sock, root, hidden
        self.uid_base = uid_base
        self.privileged = layers.identity == "uid"  # snippets get uids of their own
        self.procs: dict[int, Proc] = {}  # by job number
        self.by_pid: dict[int, Proc] = {}  # until reaped
        self.free_slots: list[int] = []
        self.num_slots = 0
        self.slot_ns: dict[int, SlotNamespaces] = {}
        self.seq = itertools.count()
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of snippets become our children, so we can kill them
        # The home PID namespace: our children, slot inits included, live in it and die with it (with us).
        self.pid_home: PidHome | None = enter_pid_home() if layers.namespaces else None

    # -- requests ----------------------------------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(msg).encode())

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op, job = msg["op"], msg["job"]
        if op == "spawn":
            try:
                self.spawn(job, bool(msg["session"]), fds)
            except Exception as exc:  # noqa: BLE001 - no slot, no fork: the zygote answers its request
                self.send({"op": "exit", "job": job, "error": f"{exc!r}"})
            finally:
                for fd in fds:
                    os.close(fd)
        elif op == "end":
            self.end(job)
        elif op == "pause":
            self.pause(job)
        elif op == "resume":
            proc = self.procs.get(job)
            if proc is not None:
                _signal(proc.pid, signal.SIGCONT)

    def spawn(self, job: int, session: bool, fds: list[int]) -> None:
        """Fork the child of ``job`` in a free slot with the zygote's pipes: ``[out, err, code, status(, done)]``."""
        if len(fds) != (5 if session else 4):
            raise ValueError(f"spawn needs {5 if session else 4} fds, got {len(fds)}")
        slot = self._take_slot()
        rules, pid = None, -1
        try:
            where = None if self.layers.namespaces else self._fresh_dir(slot)
            ns = self.slot_ns.get(slot)
            layers = self.layers
            if layers.landlock_paths is not None:
                rules = landlock_rules.ruleset(layers.landlock_paths)
            setup = ChildSetup(
                self.limits,
                where,
                out_fd=fds[0],
                err_fd=fds[1],
                code_fd=fds[2],
                status_fd=fds[3],
                done_fd=fds[4] if session else -1,
                namespaces=((ns.net_fd, CLONE_NEWNET), (ns.mnt_fd, CLONE_NEWNS)) if ns is not None else (),
                uid=self.uid_base + slot if self.privileged else None,
                nested_userns=layers.identity == "userns",
                nproc=layers.nproc,
                landlock=rules,
                seccomp=layers.seccomp,
            )
            pid = self._fork(slot)
        except BaseException:
            self.free_slots.append(slot)
            raise
        finally:
            if rules is not None and pid != 0:  # the child's copy is its own
                rules.close()
        if pid == 0:
            (session_child if session else stateless_child)(setup)
        proc = Proc(job, pid, slot, where)
        self.procs[job] = self.by_pid[pid] = proc

    def _take_slot(self) -> int:
        if self.free_slots:
            return self.free_slots.pop()
        slot = self.num_slots
        if self.privileged and slot >= self.limits.uid_block:
            raise RuntimeError(
                f"{slot} snippets or sessions at once on one sandbox worker: its uid block holds "
                f"{self.limits.uid_block}; close sessions or add sandbox workers"
            )
        if self.layers.namespaces:
            stage = os.path.join(self.root, str(slot))  # where the slot's mount namespace is staged
            os.mkdir(stage, 0o700)
            self.slot_ns[slot] = make_slot_namespaces(stage, self.hidden)
        self.num_slots += 1
        return slot

    def _fresh_dir(self, slot: int) -> str:
        """A new directory for one snippet (no mount namespace here, so no tmpfs of its own)."""
        path = os.path.join(self.root, f"{slot}.{next(self.seq)}")
        os.mkdir(path, 0o700)
        if self.privileged:
            os.chown(path, self.uid_base + slot, self.uid_base + slot)
        return path

    def _fork(self, slot: int) -> int:
        """``os.fork()``, the child born in the slot's PID namespace when it has one (see ``namespaces``)."""
        ns = self.slot_ns.get(slot)
        if ns is None or self.pid_home is None:
            return os.fork()
        check(libc.setns(ns.pid_fd, CLONE_NEWPID), "setns(slot PID namespace)")
        try:
            pid = os.fork()
        except BaseException:
            self.pid_home.join()
            raise
        if pid:
            self.pid_home.join()  # later forks (helpers, other slots) start from home again
        return pid

    # -- process control ---------------------------------------------------------------------------------------

    def end(self, job: int) -> None:
        """The zygote is done with ``job``: kill all it left, delete its scratch, free its slot."""
        proc = self.procs.pop(job, None)
        if proc is None:
            return
        proc.ended = True
        _kill_group(proc.pid)
        self._kill_leftovers(proc)
        if proc.pid in self.by_pid:
            _kill(proc.pid)
        self.kill_orphans()  # without PID namespaces what it left comes to us: dead before its scratch is removed
        if proc.scratch is not None and not scratch.remove_tree(proc.scratch):
            os.write(2, f"[zygote] could not remove {proc.scratch}\n".encode())
        self.free_slots.append(proc.slot)

    def pause(self, job: int) -> None:
        """A session answered: kill what its snippet started, then stop it until the next call (``resume``)."""
        proc = self.procs.get(job)
        if proc is None:
            return
        self._kill_leftovers(proc)
        _signal(proc.pid, signal.SIGSTOP)

    def _kill_leftovers(self, proc: Proc) -> None:
        """Kill what a snippet started: its descendants while it is unreaped (afterwards its pid could be anyone's),
        and what it left in its slot's PID namespace (orphans go to the slot's init, not to us)."""
        if proc.pid in self.by_pid:
            for pid in _descendants(proc.pid):
                _kill(pid)
        ns = self.slot_ns.get(proc.slot)
        if ns is not None:
            for pid in _descendants(ns.init_pid):
                _kill(pid)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            proc = self.by_pid.pop(pid, None)
            if proc is not None and not proc.ended:
                self.send({"op": "exit", "job": proc.job, "status": status})
        self.kill_orphans()

    def kill_orphans(self) -> None:
        """Kill every child we did not fork ourselves: as subreaper we inherit what snippets left running."""
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as f:
                kids = [int(p) for p in f.read().split()]
        except OSError:
            return
        known = set(self.by_pid) | {ns.init_pid for ns in self.slot_ns.values()}
        if self.pid_home is not None:
            known.add(self.pid_home.init_pid)
        for pid in kids:
            if pid not in known:
                _kill(pid)

    # -- loop --------------------------------------------------------------------------------------------------

    def serve(self) -> None:
        sel = selectors.DefaultSelector()
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel.register(self.sock, selectors.EVENT_READ, "zygote")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        self.send({"op": "ready", "job": None})
        while True:
            for key, _ in sel.select():
                if key.data == "wake":
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self.reap()
                    continue
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, MAX_FDS)
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return  # the zygote is gone
                self.handle(json.loads(data), fds)

    def shutdown(self) -> None:
        for job in list(self.procs):
            self.end(job)
        self.kill_orphans()
        scratch.remove_tree(self.root)


def run(limits: Limits, layers: Layers, sock: socket.socket, root: str, uid_base: int,
        hidden: list[tuple[str, str]]) -> None:  # fmt: skip
    """The forker process's whole life (called in the child of the zygote's one fork; never returns)."""
    status = 1
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the zygote, and its home PID namespace with it
        forker = Forker(limits, layers, sock, root, uid_base, hidden)
        try:
            forker.serve()
        finally:
            forker.shutdown()
        status = 0
    finally:
        os._exit(status)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int) -> None:
    _signal(pid, signal.SIGKILL)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
