"""Probe the host for each isolation layer and set the zygote up to use those it has.

``set_up`` runs first thing in the zygote, while it is still one thread: it may move the zygote into a user
namespace of its own (``torl.sandbox.namespaces``). Then ``torl.sandbox.isolation.assess`` turns what was found into
the reported level, or refuses (strict). Each probe runs in a throwaway child, so a layer counts as available only
if it really works here (a seccomp profile or an AppArmor policy can forbid what the kernel supports).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torl.sandbox import landlock_rules, seccomp_filter
from torl.sandbox.child import Limits
from torl.sandbox.isolation import NOTHING, Available, Identity, Report, assess
from torl.sandbox.namespaces import enter_own_userns, slots_work, userns_works

# Without a uid or user namespace of its own, RLIMIT_NPROC counts every task (thread) of the trainer's user: snippets
# get a ceiling this far above that count when the zygote starts. It bounds a fork bomb; threads the trainer starts
# later use up the headroom, after which snippets cannot start threads or processes (docs/sandbox.md ("Environments")).
SHARED_NPROC_HEADROOM = 256


@dataclass(frozen=True)
class Layers:
    """What the zygote's children get: the report, and the means for each layer that is on."""

    report: Report
    namespaces: bool  # children get network, mount, PID and IPC namespaces (the forker makes them)
    seccomp: seccomp_filter.Program | None
    landlock_paths: tuple[str, ...] | None  # what snippets may read, when Landlock is on
    nproc: int | None  # RLIMIT_NPROC for each snippet (None: not set)

    @property
    def identity(self) -> Identity:
        return self.report.used.identity


def set_up(limits: Limits) -> Layers:
    """Probe, enter what needs entering, assess; raises ``isolation.IsolationUnavailable`` under strict."""
    root = os.geteuid() == 0
    if limits.isolation == "none":  # no layer, but the process limit still holds (as a ceiling shared with the user)
        nproc = None if root else _user_tasks(os.geteuid()) + SHARED_NPROC_HEADROOM
        return Layers(assess("none", NOTHING), False, None, None, nproc)
    namespaces = slots_work()
    if not namespaces and userns_works(nested=not root):
        enter_own_userns()
        namespaces = True
    identity: Identity = None
    if root and _can_setuid(limits.uid_base):
        identity = "uid"
    elif namespaces and not root:
        identity = "userns"
    seccomp = seccomp_filter.probe(shared_uid=identity != "uid")
    abi = landlock_rules.abi()
    report = assess(limits.isolation, Available(identity, namespaces, seccomp is not None, abi))
    nproc = limits.max_processes if identity else _user_tasks(os.geteuid()) + SHARED_NPROC_HEADROOM
    return Layers(
        report,
        namespaces,
        seccomp,
        tuple(landlock_rules.read_paths()) if abi >= 1 else None,
        nproc,
    )


def _can_setuid(uid: int) -> bool:
    """Whether children may switch to ``uid`` (root without CAP_SETUID, or in a user namespace without it mapped,
    may not)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(uid)
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return status == 0


def _user_tasks(uid: int) -> int:
    """Threads of every process ``uid`` runs now (what RLIMIT_NPROC counts for it)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count
