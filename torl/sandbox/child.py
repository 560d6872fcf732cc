"""What runs inside a forked sandbox child: isolation steps, then the snippet as ``__main__``.

The zygote's forker (``torl.sandbox.forker``) forks and calls ``stateless_child`` or ``session_child``; both never
return. The child holds nothing of other snippets: the forker never reads a request or an output, so its memory (and
the child's copy of it) has none, and the child reads its own code from a pipe once isolated.
Isolation, in order, each step where the zygote found it available (``torl.sandbox.isolation``): new session, the
slot's own network namespace (no network, loopback down) and mount namespace (an unreadable home replaced by a tmpfs
showing only the Python prefix), built once per slot and joined per snippet (``torl.sandbox.namespaces``; the forker
forks the child straight into the slot's PID namespace); then a mount and IPC namespace of the snippet's own, with a
fresh size-limited tmpfs as /tmp, /var/tmp and /dev/shm (where there are no namespaces: a fresh directory made for
this snippet), Landlock rules (``torl.sandbox.landlock_rules``: the forker's ruleset plus this scratch), stdin from
/dev/null, pipes on fd 1/2, every other inherited fd closed, a scrubbed environment, rlimits, an unprivileged uid of
its own (or, for a non-root zygote, an unmapped uid in a user namespace of its own), and last the seccomp filter
(``torl.sandbox.seccomp_filter``). A setup failure is reported on a status pipe that the snippet never holds, so
only the sandbox can report one.
Standard library only (plus ``landlock_rules``). Not here: timeouts, output caps and killing leftovers (the zygote and
its forker do those from outside).
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import json
import linecache
import os
import resource
import signal
import sys
import threading
import traceback
import types
from dataclasses import dataclass, field
from typing import Any, NoReturn

from torl.sandbox import landlock_rules

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SNIPPET_FILENAME = "<snippet>"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
STATUS_FD = 1023  # where the setup-status pipe waits during setup; closed before the snippet runs
MS_NOSUID, MS_NODEV, MS_BIND = 2, 4, 4096
SCRATCH_INODES = 16384  # files and directories a snippet's tmpfs holds (their kernel memory is outside size=)


@dataclass
class Limits:
    """What the zygote enforces; built from the JSON on its command line (fields mirror ``SandboxConfig``)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: int = 0
    max_output_bytes: int = 65536
    max_processes: int = 16
    max_open_files: int = 64
    max_file_mb: int = 64
    scratch_mb: int = 256
    preload: list[str] = field(default_factory=list)
    isolation: str = "strict"  # strict | best | none (torl.sandbox.isolation)
    uid_base: int = 200000
    uid_block: int = 1000  # uids a zygote may use from its base (its slots: concurrent snippets + live sessions)
    session_idle_s: float = 600.0
    scratch_root: str = "/tmp"

    @classmethod
    def from_json(cls, text: str) -> Limits:
        data = json.loads(text) if text else {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown zygote limit(s): {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested).


def snippet_env(home: str) -> dict[str, str]:
    """The whole environment a snippet sees: nothing inherited, so no secrets or cluster addresses can leak."""
    return {
        "PATH": SAFE_PATH,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }


def exit_code_of(exc: SystemExit) -> int:
    """The process exit code Python itself would use for ``sys.exit(arg)``."""
    arg = exc.code
    if arg is None:
        return 0
    if isinstance(arg, int):
        return arg & 0xFF
    sys.stderr.write(f"{arg}\n")
    return 1


# ---------------------------------------------------------------------------------------------------------------
# Child side: runs after fork, never returns.

libc = ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@dataclass
class ChildSetup:
    """How to isolate one child: built by the forker for the child's slot, used after fork.

    ``scratch``: the fresh directory made for this snippet, or None where the child mounts its own tmpfs (it has a
    mount namespace); ``fds``: the pipes that become fds 1, 2, 3 (code in), 4 (session: done out) and the status
    pipe; ``namespaces``: ``(fd, CLONE_NEW*)`` of the slot's network and mount namespaces; ``uid``: the slot's own uid
    (root zygotes); ``nested_userns``: enter an unmapped user namespace instead (non-root zygotes); ``nproc``: the
    RLIMIT_NPROC to set, or None; ``landlock``: the child's own ruleset without its scratch
    (``landlock_rules.ruleset``) when Landlock is on, else None;
    ``seccomp``: the filter (``seccomp_filter.Program``) or None.
    """

    limits: Limits
    scratch: str | None
    out_fd: int
    err_fd: int
    code_fd: int
    status_fd: int
    done_fd: int = -1
    namespaces: tuple[tuple[int, int], ...] = ()
    uid: int | None = None
    nested_userns: bool = False
    nproc: int | None = None
    landlock: Any = None
    seccomp: Any = None


def _own_tmp(setup: ChildSetup) -> None:
    """A mount and IPC namespace of this snippet's own, with a fresh tmpfs over /tmp, /var/tmp and /dev/shm.

    Fresh per snippet, so nothing one snippet leaves (files, xattrs, times, SysV or POSIX IPC objects) reaches the
    next one in the slot, and nothing needs deleting: the kernel frees both namespaces with the snippet's last
    process. The tmpfs size bounds what the snippet writes in all (memory, not disk)."""
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare(mount, IPC)")
    owner = f",uid={setup.uid},gid={setup.uid}" if setup.uid is not None else ""
    opts = f"size={setup.limits.scratch_mb}m,nr_inodes={SCRATCH_INODES},mode=0700{owner}".encode()
    check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mount scratch tmpfs on /tmp")
    for target in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(target):
            check(libc.mount(b"/tmp", target.encode(), None, MS_BIND, None), f"bind scratch over {target}")


def enter_sandbox(setup: ChildSetup) -> str:
    """Isolate this freshly forked child; its code pipe ends up as fd 3 (and a session's done pipe as fd 4);
    returns the snippet's cwd/HOME.

    Joining the slot's namespaces is cheap, while creating a network namespace per snippet cost ~1 ms here plus
    kernel clean-up work, and building the private mounts another ~1.3 ms (``torl.sandbox.namespaces``); the
    snippet's own mount and IPC namespace with its tmpfs cost ~0.3 ms, adding its scratch to its Landlock rules and
    enforcing them ~0.1 ms.
    """
    os.dup2(setup.status_fd, STATUS_FD, inheritable=False)  # first: setup failures are reported there
    limits = setup.limits
    os.setsid()  # own session and process group: the forker kills the whole group
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):  # SIGPIPE stays ignored, as in any Python script
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    home = setup.scratch
    for fd, nstype in setup.namespaces:  # with the zygote's capabilities: the slot's network and mount namespaces
        check(libc.setns(fd, nstype), f"setns({nstype:#x})")
    if home is None:
        _own_tmp(setup)
        home = "/tmp"
    if setup.landlock is not None:
        landlock_rules.restrict(setup.landlock, home)  # after the mounts (a rule names this scratch's inode), and
        # before the fds are closed (its own is among them)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(setup.out_fd, 1)
    os.dup2(setup.err_fd, 2)
    extra = [setup.code_fd] + ([setup.done_fd] if setup.done_fd >= 0 else [])
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in extra]
    for i, fd in enumerate(parked):
        os.dup2(fd, 3 + i, inheritable=False)
    # Nothing of the zygote (its protocol socket, other jobs' pipes, namespace fds) stays reachable.
    os.closerange(3 + len(parked), STATUS_FD)
    os.closerange(STATUS_FD + 1, 65536)
    os.chdir(home)
    os.environ.clear()
    os.environ.update(snippet_env(home))
    mem = limits.memory_mb * 1024 * 1024
    cpu = limits.cpu_s or int(limits.timeout_s + 1.999)
    for res, value in (
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_CPU, cpu),  # a session child raises its soft limit per snippet (hard limit stays open)
        (resource.RLIMIT_NOFILE, limits.max_open_files),
        (resource.RLIMIT_FSIZE, limits.max_file_mb * 1024 * 1024),
        (resource.RLIMIT_CORE, 0),
    ):
        hard = resource.RLIM_INFINITY if res == resource.RLIMIT_CPU and setup.done_fd >= 0 else value
        resource.setrlimit(res, (value, hard))
    if setup.nested_userns:
        # Before RLIMIT_NPROC: the kernel counts processes per user namespace and uid, and holds the new namespace's
        # parent level to the limit in force when it was created (docs/platform-notes.md §13).
        check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    if setup.nproc is not None:
        # RLIMIT_NPROC counts processes per uid and is ignored for root (docs/platform-notes.md §7): each concurrent
        # snippet gets its own uid (or user namespace) so the limit is per snippet.
        resource.setrlimit(resource.RLIMIT_NPROC, (setup.nproc, setup.nproc))
    if setup.uid is not None:
        os.setgroups([])
        os.setgid(setup.uid)
        os.setuid(setup.uid)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setuid, which clears it
    if setup.seccomp is not None:
        setup.seccomp.install()  # last: it denies the unshare above
    os.close(STATUS_FD)  # isolated: from here on, whatever goes wrong is the snippet's own failure
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    return home


def _fresh_main() -> dict[str, Any]:
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = __builtins__
    module.__dict__["__file__"] = SNIPPET_FILENAME
    sys.modules["__main__"] = module
    return module.__dict__


def run_code(code: str, namespace: dict[str, Any]) -> int:
    """Run ``code`` in ``namespace`` like ``python script.py`` would; returns the exit code (tracebacks on stderr)."""
    linecache.cache[SNIPPET_FILENAME] = (len(code), None, code.splitlines(True), SNIPPET_FILENAME)
    # Threads alive before the snippet are not its own: a host process (a test run, a persistent session)
    # may hold non-daemon workers that never end, and joining them would hang the call.
    before = set(threading.enumerate())
    try:
        exec(compile(code, SNIPPET_FILENAME, "exec"), namespace)
        # Like interpreter shutdown: wait for the non-daemon threads the snippet started.
        for thread in threading.enumerate():
            if thread not in before and not thread.daemon:
                thread.join()
        return 0
    except SystemExit as exc:
        return exit_code_of(exc)
    except BaseException:  # noqa: BLE001 - any exception of model code is a failed run, reported on stderr
        # Drop this frame from the traceback so the model sees only its own lines, as in a script run.
        etype, value, tb = sys.exc_info()
        traceback.print_exception(etype, value, tb.tb_next if tb is not None else None)
        return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the snippet may have closed or replaced its streams
            pass


def _report_setup_failure() -> None:
    """Write why isolation failed on the status pipe (the forker's side channel, which the snippet never holds)."""
    try:
        os.write(STATUS_FD, traceback.format_exc().encode())
    except OSError:
        pass


def _read_code(fd: int) -> str:
    """The snippet's code: everything on its code pipe up to EOF (the zygote closes its end after writing)."""
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def stateless_child(setup: ChildSetup) -> NoReturn:
    try:
        enter_sandbox(setup)
        code = _read_code(3)
    except BaseException:  # noqa: BLE001 - a setup failure must never fall back into the forker's loop
        _report_setup_failure()
        os._exit(125)
    status = 1
    try:
        status = run_code(code, _fresh_main())
        _flush()
    finally:
        os._exit(status)


def session_child(setup: ChildSetup) -> NoReturn:
    """Serve one session: read a JSON line per snippet on fd 3, run it in the same globals, answer on fd 4.

    Between snippets the forker stops this process (SIGSTOP), so nothing the snippet left running (a thread) runs
    unaccounted; what fd 4 says only ends the current call early, it cannot make the zygote think the process idle."""
    status = 125
    try:
        limits = setup.limits
        try:
            enter_sandbox(setup)
        except BaseException:  # noqa: BLE001
            _report_setup_failure()
            os._exit(125)
        ctrl = os.fdopen(3, "rb")
        namespace = _fresh_main()
        cpu = limits.cpu_s or int(limits.timeout_s + 1.999)
        while line := ctrl.readline():
            code = json.loads(line)["code"]
            # RLIMIT_CPU counts the whole life of the process: give each snippet its own budget on top of what
            # earlier snippets used (the wall timeout stays the real bound).
            used = resource.getrusage(resource.RUSAGE_SELF)
            soft = int(used.ru_utime + used.ru_stime) + cpu
            resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
            rc = run_code(code, namespace)
            _flush()
            os.write(4, (json.dumps({"exit": rc}) + "\n").encode())
        status = 0
    finally:
        os._exit(status)
