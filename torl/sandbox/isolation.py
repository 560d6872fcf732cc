"""Isolation levels: which protection layers a zygote got, what ``sandbox.isolation`` makes of that, and how to say it.

The zygote probes its host once (``torl.sandbox.namespaces``, ``seccomp_filter``, ``landlock_rules``) and hands
the result, an ``Available``, to ``assess``. ``strict`` refuses to start when any layer is missing, naming it and
the ways to get it; ``best`` runs with what there is and reports the rest; ``none`` uses no layer at all (rlimits,
the timeout and the output cap stay: they guard the trainer's resources, not its secrets). The layers and what
each protects against are in docs/sandbox.md ("Layers", "Environments"); the facts behind them in
docs/platform-notes.md §13.

Pure logic: no system calls here, so the level names and the messages are unit-tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Isolation = Literal["strict", "best", "none"]
Identity = Literal["uid", "userns"] | None
LEVEL_VALUE = {"full": 2.0, "partial": 1.0, "none": 0.0}  # the run's metric ``sandbox/isolation``

# What each layer is, what its absence leaves open, and how a user gets it. Keys as in ``Available.missing``.
NAMES = {
    "identity": "a user identity of the snippet's own (a uid per slot, or an unmapped uid in a user namespace)",
    "namespaces": "network, mount, PID and IPC namespaces",
    "seccomp": "the seccomp filter",
    "landlock": "Landlock",
}
HOW_TO_GET = {
    "identity": "run the trainer as root (snippets then get uids of their own), or allow unprivileged user "
    "namespaces (see namespaces)",
    "namespaces": "allow user namespaces: sysctl user.max_user_namespaces > 0 (and "
    "kernel.unprivileged_userns_clone=1 on Debian kernels before 5.10, kernel.apparmor_restrict_unprivileged_userns=0 "
    "on Ubuntu 23.10+); in Docker run with --security-opt seccomp=unconfined or a profile that allows unshare, setns "
    "and mount (or --cap-add SYS_ADMIN)",
    "seccomp": "a kernel with CONFIG_SECCOMP_FILTER, libseccomp (apt install libseccomp2) and the pyseccomp package",
    "landlock": "Linux 5.13 or newer with landlock in the LSM list (CONFIG_LSM or the lsm= boot parameter), and in "
    "containers a seccomp profile that allows the landlock_* system calls",
}
EXPOSED = {
    "identity": "snippets run as the trainer's own user: RLIMIT_NPROC counts all of that user's processes, so a fork "
    "bomb is held by a shared ceiling, not by sandbox.max_processes",
    "namespaces": "no network, mount, PID or IPC namespace: the network, UNIX sockets and SysV/POSIX IPC are closed "
    "by seccomp (and the network by Landlock) alone; scratch is a fresh directory on disk per snippet, bounded per "
    "file (sandbox.max_file_mb) but not in total; /tmp and /dev/shm are not private (Landlock denies opening them)",
    "seccomp": "system calls an unprivileged process may make stay open: ptrace of its own processes, io_uring, bpf, "
    "perf_event_open, keyctl, memfd_create (memory outside RLIMIT_AS), connect() to pathname UNIX sockets the "
    "snippet's user may write (a docker.sock of a group the trainer belongs to), and without a uid of its own, "
    "renicing the trainer's processes and changing the mode, times and xattrs of its files (Landlock does not "
    "govern them); without namespaces, so are the network and the host's SysV/POSIX IPC",
    "landlock": "files: the snippet reads and writes whatever its user may (a world-readable output_dir, and without "
    "a uid of its own the trainer's home, checkpoints and weight files)",
}
SIGNALS_EXPOSED = (
    "signals: without a PID namespace, a uid of its own or Landlock ABI 6 (Linux 6.12), kill(-1) and kill(pid) reach "
    "every process of the trainer's user"
)


@dataclass(frozen=True)
class Available:
    """What the zygote found it can use. ``identity``: "uid" (a uid per slot, as root), "userns" (an unmapped uid in
    a user namespace of its own per snippet) or None; ``namespaces``: network, mount and PID namespaces per slot;
    ``landlock``: the kernel's Landlock ABI version (0 = none)."""

    identity: Identity
    namespaces: bool
    seccomp: bool
    landlock: int

    def missing(self) -> list[str]:
        present = {
            "identity": self.identity is not None,
            "namespaces": self.namespaces,
            "seccomp": self.seccomp,
            "landlock": self.landlock >= 1,
        }
        return [name for name, ok in present.items() if not ok]


NOTHING = Available(identity=None, namespaces=False, seccomp=False, landlock=0)


@dataclass(frozen=True)
class Report:
    """The isolation a zygote runs with: what was asked for, the level reached, and what is missing or exposed."""

    requested: Isolation
    level: Literal["full", "partial", "none"]
    used: Available
    missing: tuple[str, ...]
    exposed: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """The ``isolation`` entry of the zygote's ready message (JSON)."""
        return {
            "requested": self.requested,
            "level": self.level,
            "identity": self.used.identity,
            "namespaces": self.used.namespaces,
            "seccomp": self.used.seccomp,
            "landlock": self.used.landlock,
            "missing": list(self.missing),
            "exposed": list(self.exposed),
        }


class IsolationUnavailable(RuntimeError):
    """``sandbox.isolation=strict`` on a host that lacks a layer; the message says which and how to get it."""


def assess(requested: Isolation, found: Available) -> Report:
    """The report for ``requested`` on a host offering ``found``; raises ``IsolationUnavailable`` under strict.

    >>> assess("best", Available("uid", True, True, 7)).level
    'full'
    >>> assess("best", Available(None, False, True, 7)).missing
    ('identity', 'namespaces')
    """
    if requested == "none":
        return Report("none", "none", NOTHING, (), ("everything: isolation is off (sandbox.isolation=none)",))
    missing = tuple(found.missing())
    if missing and requested == "strict":
        raise IsolationUnavailable(refusal(missing))
    exposed = [EXPOSED[name] for name in missing]
    if found.identity is None and not found.namespaces and found.landlock < 6:
        exposed.append(SIGNALS_EXPOSED)
    return Report(requested, "partial" if missing else "full", found, missing, tuple(exposed))


def refusal(missing: tuple[str, ...]) -> str:
    """Why strict isolation cannot start here and how to get each missing layer."""
    ways = "\n".join(f"  - {NAMES[name]}: {HOW_TO_GET[name]}" for name in missing)
    return (
        f"sandbox.isolation=strict: this host lacks {'; '.join(NAMES[m] for m in missing)}. Model-written code would "
        f"run less isolated than asked, so the sandbox does not start. Ways to get what is missing:\n{ways}\n"
        "Or set sandbox.isolation=best to run with the layers available (one warning lists what stays exposed, and "
        "the run's metrics report the level)."
    )


def warning(reports: list[dict[str, Any]]) -> str | None:
    """One loud warning for a pool whose workers run with partial isolation (``None`` when all are full or none)."""
    partial = [r for r in reports if r.get("level") == "partial"]
    if not partial:
        return None
    missing = [NAMES[m] for m in NAMES if any(m in r["missing"] for r in partial)]
    exposed = list(dict.fromkeys(e for r in partial for e in r["exposed"]))
    lines = "\n".join(f"  - {e}" for e in exposed)
    return (
        f"SANDBOX ISOLATION IS PARTIAL (sandbox.isolation=best): missing {'; '.join(missing)} on "
        f"{len(partial)} of {len(reports)} workers. Model-written code can reach:\n{lines}\n"
        'Set sandbox.isolation=strict to refuse such hosts; docs/sandbox.md ("Layers") says how to get '
        "each layer."
    )
