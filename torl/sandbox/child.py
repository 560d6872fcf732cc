"""What runs inside a forked sandbox child: isolation steps, then the snippet as ``__main__``.

The zygote (``torl.sandbox.zygote``) forks and calls ``stateless_child`` or ``session_child``; both never return.
Isolation, in order: new session, the slot's own network namespace (no network, loopback down) and mount namespace
(scratch bound over /tmp, /var/tmp and /dev/shm; an unreadable home replaced by a tmpfs showing only the Python
prefix), both built once per slot and joined per snippet (``make_slot_namespaces``), stdin from /dev/null, pipes on
fd 1/2, every other inherited fd closed, a scrubbed environment, rlimits, and an unprivileged uid of its own.
Standard library only. Not here: timeouts, output caps and killing leftovers (the zygote does those from outside).
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

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SNIPPET_FILENAME = "<snippet>"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


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
    preload: list[str] = field(default_factory=list)
    isolate_network: bool = True
    private_mounts: bool = True
    drop_privileges: bool = True
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


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


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


def _mount_scratch(scratch: str, hidden: list[tuple[str, str]]) -> None:
    """In a fresh private mount namespace: scratch bound over /tmp, /var/tmp and /dev/shm (writes land in scratch and
    vanish with it), unreadable homes replaced by an empty tmpfs that shows only the Python prefix."""
    for i, (top, path) in enumerate(hidden):
        stage = f"{scratch}/.prefix{i}"
        os.mkdir(stage)
        _check(libc.mount(path.encode(), stage.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
        _check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k"), "tmpfs")
        os.makedirs(path, exist_ok=True)
        _check(libc.mount(stage.encode(), path.encode(), None, MS_MOVE, None), f"move {path}")
        os.rmdir(stage)
    for target in ("/var/tmp", "/dev/shm", "/tmp"):  # /tmp last: the scratch path itself lives under it
        if os.path.isdir(target):
            _check(libc.mount(scratch.encode(), target.encode(), None, MS_BIND, None), f"bind {target}")


def make_slot_namespaces(
    scratch: str, hidden: list[tuple[str, str]], network: bool, mounts: bool
) -> tuple[tuple[int, int], ...]:
    """Build a slot's network and/or mount namespaces once; return ``(fd, CLONE_NEW*)`` pairs that keep them alive.

    A short-lived helper child unshares them (and sets up the private mounts for ``scratch``), the caller opens them
    through /proc, and the helper exits. Children of the slot then ``setns`` into them. Isolation stays per snippet:
    a slot runs one snippet at a time, the zygote kills every process a snippet leaves behind before the slot is
    reused (so no socket or listener survives into the next snippet), a fresh namespace has its loopback down, and
    snippets run unprivileged, so they cannot change the mounts. Needs CAP_SYS_ADMIN (the zygote probes for it).
    """
    flags = (CLONE_NEWNET if network else 0) | (CLONE_NEWNS if mounts else 0)
    if not flags:
        return ()
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(ready_r)
            os.close(hold_w)
            _check(libc.unshare(flags), "unshare")
            if flags & CLONE_NEWNS:
                _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
                _mount_scratch(scratch, hidden)
            os.write(ready_w, b"1")
            os.read(hold_r, 1)  # wait until the parent holds the namespaces open
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"1":
            os.waitpid(pid, 0)
            raise OSError(f"building the sandbox namespaces of {scratch} failed")
        kinds = [(name, flag) for name, flag in (("net", CLONE_NEWNET), ("mnt", CLONE_NEWNS)) if flags & flag]
        return tuple((os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag) for name, flag in kinds)
    finally:
        os.close(ready_r)
        os.close(hold_w)  # the helper's read returns, it exits; the namespaces live on through our fds
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def enter_sandbox(
    limits: Limits,
    scratch: str,
    uid: int | None,
    out_fd: int,
    err_fd: int,
    net_mode: str,
    hidden: list[tuple[str, str]],
    namespaces: tuple[tuple[int, int], ...] = (),
    extra_fds: tuple = (),
) -> str:
    """Isolate this freshly forked child; ``extra_fds`` end up as fds 3, 4, ...; returns the snippet's cwd/HOME.

    ``namespaces`` are ``(fd, CLONE_NEW*)`` of namespaces the zygote already built for this child's slot (see
    ``make_slot_namespaces``): joining them is cheap, while creating a network namespace per snippet cost ~1 ms here
    plus kernel clean-up work, and building the private mounts another ~1.3 ms.
    """
    os.setsid()  # own session and process group: the zygote kills the whole group
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):  # SIGPIPE stays ignored, as in any Python script
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    home = scratch
    for fd, nstype in namespaces:  # as root: the slot's network and mount namespaces
        _check(libc.setns(fd, nstype), f"setns({nstype:#x})")
        if nstype == CLONE_NEWNS:
            home = "/tmp"
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in extra_fds]
    for i, fd in enumerate(parked):
        os.dup2(fd, 3 + i, inheritable=False)
    os.closerange(
        3 + len(parked), 65536
    )  # nothing of the zygote (its protocol pipe, other jobs' pipes) stays reachable
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
        hard = resource.RLIM_INFINITY if res == resource.RLIMIT_CPU and extra_fds else value
        resource.setrlimit(res, (value, hard))
    if uid is not None:
        # RLIMIT_NPROC counts processes per uid and is ignored for root (docs/platform-notes.md §7): each concurrent
        # snippet gets its own uid so the limit is per snippet and snippets cannot signal one another.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if net_mode == "userns":
        # No CAP_SYS_ADMIN (an unprivileged zygote, or root in a container): a user+net namespace instead, entered
        # last, as the snippet's own uid. Entered as root, the new namespace could no longer reach the scratch dir.
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setuid, which clears it
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
    try:
        exec(compile(code, SNIPPET_FILENAME, "exec"), namespace)
        # Like interpreter shutdown: wait for non-daemon threads the snippet started.
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
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


SETUP_FAILED = "[sandbox] setup failed"


def _report_setup_failure(err_fd: int) -> None:
    """Write why isolation failed where the zygote will read it (the pipe, or fd 2 once it was moved there)."""
    msg = f"{SETUP_FAILED}\n{traceback.format_exc()}".encode()
    for fd in (err_fd, 2):
        try:
            os.write(fd, msg)
            return
        except OSError:
            continue


def stateless_child(code: str, setup: tuple) -> NoReturn:
    try:
        enter_sandbox(*setup)
    except BaseException:  # noqa: BLE001 - a setup failure must never fall back into the zygote's loop
        _report_setup_failure(setup[4])
        os._exit(125)
    status = 1
    try:
        status = run_code(code, _fresh_main())
        _flush()
    finally:
        os._exit(status)


def session_child(ctrl_fd: int, done_fd: int, setup: tuple) -> NoReturn:
    """Serve one session: read a JSON line per snippet on fd 3, run it in the same globals, answer on fd 4."""
    status = 125
    try:
        limits: Limits = setup[0]
        try:
            enter_sandbox(*setup, extra_fds=(ctrl_fd, done_fd))
        except BaseException:  # noqa: BLE001
            _report_setup_failure(setup[4])
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
