"""Namespaces for sandbox children: network, mount and PID namespaces per slot (and a mount and IPC namespace per
snippet, ``torl.sandbox.child``), with or without privilege.

Root with CAP_SYS_ADMIN creates them directly. Anyone else (a non-root user, root in a container without
CAP_SYS_ADMIN) first moves the zygote into a user namespace of its own, where it holds the capabilities over
namespaces it creates (``enter_own_userns``): root keeps every uid there (a full identity map, written by a helper
that still has CAP_SETUID outside), so snippets still get uids of their own; another user maps only itself, and
each of its snippets then enters a further user namespace as an unmapped uid with no power over the slot's
namespaces (``torl.sandbox.child``).

PID namespaces: the forker (``torl.sandbox.forker``) moves its own future children into a "home" PID namespace
(``enter_pid_home``) and each slot gets a PID namespace nested in it, with an idle init process that reaps orphans.
Before forking a snippet the forker points its children at the slot's namespace (``setns``) and afterwards back
home: no second fork per snippet, and the snippet is not PID 1 (which would ignore its own SIGTERM). A snippet's
``kill(-1)`` and ``kill(pid)`` then reach only its own slot; when the forker dies, the home init dies with it and
the kernel kills every process in the namespaces below. Joining the home namespace back needs no privilege outside
the user namespace, which joining the forker's original one would (docs/platform-notes.md §13).

Standard library only (plus ``torl.sandbox.child``).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import NoReturn

from torl.sandbox.child import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    PR_SET_PDEATHSIG,
    check,
    libc,
)

MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
SLOT_FLAGS = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID


def hidden_prefixes(paths: list[str]) -> list[tuple[str, str]]:
    """``(top, path)`` for each path an unprivileged uid cannot reach because ``top`` (an ancestor) is not o+x.

    The venv's base Python lives under /root (mode 0700), so a snippet running as another uid could not import a
    stdlib module that the zygote did not preload; the child re-exposes just that prefix (docs/platform-notes.md §7).
    """
    out = []
    for path in dict.fromkeys(os.path.realpath(p) for p in paths):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            top = "/" + "/".join(parts[:i])
            if not os.stat(top).st_mode & 0o001:
                out.append((top, path))
                break
    return out


def can_unshare(flags: int) -> bool:
    """Whether a child of ours may create these namespaces (tried in a throwaway child)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if libc.unshare(flags) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return status == 0


def slots_work() -> bool:
    """Whether a child of ours may make slot namespaces and mount in them (tried in a throwaway child: a security
    profile may allow the namespaces but deny ``mount``, as Docker's AppArmor profile does)."""
    pid = os.fork()
    if pid == 0:
        ok = (
            libc.unshare(SLOT_FLAGS) == 0
            and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0
            and libc.mount(b"/tmp", b"/tmp", None, MS_BIND, None) == 0
            # what each child does on top (torl.sandbox.child): its own mount and IPC namespace and tmpfs
            and libc.unshare(CLONE_NEWNS | CLONE_NEWIPC) == 0
            and libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m") == 0
        )
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return status == 0


def enter_own_userns() -> None:
    """Move this (single-threaded) process into a new user namespace holding every capability over what it creates.

    Root maps all uids to themselves, which needs CAP_SETUID and CAP_SETGID in the parent namespace: a helper forked
    beforehand writes the maps (a process cannot write a full map for itself once inside). Another user may map only
    its own uid and gid, to 0 here, after denying setgroups.
    """
    if os.geteuid() != 0:
        uid, gid = os.geteuid(), os.getegid()
        check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        return
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(go_w)
            if os.read(go_r, 1) == b"1":
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{os.getppid()}/{name}", "w") as f:
                        f.write("0 0 4294967295")
                status = 0
        finally:
            os._exit(status)
    os.close(go_r)
    entered = libc.unshare(CLONE_NEWUSER) == 0
    os.write(go_w, b"1" if entered else b"0")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    if not entered or status != 0:
        raise OSError("could not enter a user namespace with an identity map")


def userns_works(nested: bool) -> bool:
    """Whether ``enter_own_userns`` and then slot namespaces (and, if ``nested``, a further user namespace) work.

    Tried in a throwaway child: a host may allow the user namespace but not the rest (an AppArmor policy, a
    seccomp profile), and the zygote must not move into one it cannot use.
    """
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            enter_own_userns()
            ok = slots_work() and (not nested or can_unshare(CLONE_NEWUSER))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return status == 0


def _be_init(hold_fd: int, die_with_parent: bool) -> NoReturn:
    """Idle as a PID namespace's init: the kernel reaps its children; it exits when ``hold_fd`` reaches EOF."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # orphans reparented to us are reaped by the kernel
        if die_with_parent:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.closerange(0, hold_fd)  # nothing of the zygote's (its protocol pipes above all) stays open here
        os.closerange(hold_fd + 1, 65536)
        os.read(hold_fd, 1)
    finally:
        os._exit(0)


@dataclass(frozen=True)
class PidHome:
    """The zygote's home PID namespace: its init's pid, an fd to join it back, and the pipe end keeping it alive."""

    init_pid: int
    ns_fd: int
    hold_fd: int

    def join(self) -> None:
        """Point the zygote's future children back at the home namespace."""
        check(libc.setns(self.ns_fd, CLONE_NEWPID), "setns(home PID namespace)")


def enter_pid_home() -> PidHome:
    """Send the zygote's future children into a new PID namespace, whose init dies with the zygote."""
    check(libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _be_init(hold_r, die_with_parent=True)
    os.close(hold_r)
    return PidHome(pid, os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC), hold_w)


@dataclass(frozen=True)
class SlotNamespaces:
    """One slot's network, mount and PID namespaces (fds to join them) and the init of its PID namespace."""

    net_fd: int
    mnt_fd: int
    pid_fd: int
    init_pid: int
    hold_fd: int  # the slot init lives while the zygote holds this


def reexpose(hidden: list[tuple[str, str]], stage_dir: str) -> None:
    """In a private mount namespace: cover each ``top`` of ``hidden`` with an empty tmpfs that shows only its paths.

    Paths under one top share its tmpfs (a second tmpfs over the same top would hide what the first showed); each is
    bound to a stage under ``stage_dir`` first, since the tmpfs hides the original."""
    by_top: dict[str, list[str]] = {}
    for top, path in hidden:
        by_top.setdefault(top, []).append(path)
    for top, paths in by_top.items():
        paths = [p for p in paths if not any(p.startswith(q + "/") for q in paths)]  # a path inside another goes along
        stages = [f"{stage_dir}/.prefix{i}" for i in range(len(paths))]
        for path, stage in zip(paths, stages, strict=True):
            os.mkdir(stage)
            check(libc.mount(path.encode(), stage.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
        check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k"), "tmpfs")
        for path, stage in zip(paths, stages, strict=True):
            os.makedirs(path, exist_ok=True)
            check(libc.mount(stage.encode(), path.encode(), None, MS_MOVE, None), f"move {path}")
            os.rmdir(stage)


def make_slot_namespaces(scratch: str, hidden: list[tuple[str, str]]) -> SlotNamespaces:
    """Build a slot's namespaces once; children of the slot then join them (``setns``) instead of creating them.

    A short-lived helper child unshares them, re-exposes the Python installation (``scratch`` is its staging
    directory; each child then mounts a tmpfs of its own over /tmp, ``torl.sandbox.child``) and forks the slot's init;
    the caller opens the namespaces through /proc and the helper exits. Isolation stays per snippet: a slot runs one
    snippet at a time, the zygote kills every process a snippet leaves behind before the slot is reused (so no socket
    or listener survives into the next snippet), a fresh namespace has its loopback down, and snippets have no
    capability over these namespaces, so they cannot change the mounts. Creating a network namespace per snippet
    cost ~1 ms here plus kernel clean-up work, and building the private mounts another ~1.3 ms.
    """
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    keep_r, keep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            for fd in (ready_r, hold_w, keep_w):
                os.close(fd)
            check(libc.unshare(SLOT_FLAGS), "unshare(net, mount, pid)")
            check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
            reexpose(hidden, scratch)
            if os.fork() == 0:
                _be_init(keep_r, die_with_parent=False)
            os.write(ready_w, b"1")
            os.read(hold_r, 1)  # wait until the parent holds the namespaces open
            status = 0
        finally:
            os._exit(status)
    for fd in (ready_w, hold_r, keep_r):
        os.close(fd)
    try:
        if os.read(ready_r, 1) != b"1":
            os.close(keep_w)
            raise OSError(f"building the sandbox namespaces of {scratch} failed")
        fds = [os.open(f"/proc/{pid}/ns/{n}", os.O_RDONLY | os.O_CLOEXEC) for n in ("net", "mnt", "pid_for_children")]
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            init_pid = int(f.read().split()[0])
        return SlotNamespaces(*fds, init_pid=init_pid, hold_fd=keep_w)
    finally:
        os.close(ready_r)
        os.close(hold_w)  # the helper's read returns, it exits; the namespaces live on through our fds
        os.waitpid(pid, 0)
