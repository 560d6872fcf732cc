"""The project's own seccomp filter, applied in each sandbox child right before the snippet runs.

It allows every system call except those a math snippet never needs and an escape would: every socket but a
connected AF_UNIX pair (no network even without a network namespace, and no connect() to a pathname UNIX socket
outside scratch, such as /run/dbus, journald or a docker.sock of a group the trainer belongs to: seccomp cannot read
the path, so ``socket(AF_UNIX)`` itself is denied; ``socketpair`` stays), SysV IPC and POSIX message queues (shared
with the host where there is no IPC namespace), ``memfd_create`` (memory outside RLIMIT_AS), changing the priority
or limits of another process (``setpriority`` of anything but itself, ``prlimit64`` setting another's), where
snippets act as the trainer's own user the metadata calls Landlock does not govern (``chmod``, ``chown``, xattrs,
``utime``: ``METADATA``), namespace and mount calls (``unshare``, ``setns``,
``clone`` with a ``CLONE_NEW*`` flag, ``mount`` and the new mount API), ``ptrace`` and cross-process memory access,
``bpf``, ``perf_event_open``, ``io_uring`` (it can open sockets past the filter), keyrings, ``kexec_*``, module
loading and the like. Denied calls fail with an errno, so the snippet gets an ordinary Python exception. A seccomp
filter needs no privilege (only ``no_new_privs``), so this layer holds for non-root users and inside Docker's own
default profile.

libseccomp (through ``pyseccomp``, a ctypes binding with the official binding's API) writes the BPF program once
per zygote; a child only installs those bytes with the ``seccomp`` system call: ``seccomp_load`` regenerates the
program on every call, 0.6 ms per child here against 0.2 ms to install it (docs/platform-notes.md §13).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import tempfile

from torl.sandbox.child import libc

# EPERM, as the kernel itself answers an unprivileged caller of most of these.
DENIED = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "syslog", "acct", "quotactl", "lookup_dcookie", "iopl", "ioperm", "vhangup",
    "name_to_handle_at", "open_by_handle_at", "fanotify_init",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "shmget", "shmat", "shmdt", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semtimedop",
    "semctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
    "memfd_create", "memfd_secret",
)  # fmt: skip
# Where snippets keep the trainer's kernel uid (a non-root trainer: an unmapped uid in a user namespace still acts as
# the trainer on files; or no identity at all), they own the trainer's files, and Landlock does not govern metadata:
# mode, owner, extended attributes and times of any file they can name would be theirs to change.
METADATA = (
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "setxattrat", "removexattrat",
    "utime", "utimes", "utimensat", "futimesat",
)  # fmt: skip
# (system call, argument index) pairs denied unless that argument is 0, i.e. the caller itself.
SELF_ONLY = (
    ("setpriority", 0), ("setpriority", 1), ("sched_setscheduler", 0), ("sched_setparam", 0), ("sched_setattr", 0),
    ("ioprio_set", 1),
)  # fmt: skip
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
SECCOMP_SET_MODE_FILTER = 1
PR_SET_NO_NEW_PRIVS = 38


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Program:
    """A BPF program ready to install: built in the zygote, inherited by every forked child."""

    def __init__(self, bpf: bytes, seccomp_nr: int) -> None:
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._fprog = _SockFprog(len(bpf) // 8, ctypes.cast(self._buf, ctypes.c_void_p))
        self.seccomp_nr = seccomp_nr

    def install(self) -> None:
        """Apply the filter to this process and its future children (irreversible)."""
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(self.seccomp_nr, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(self._fprog)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")


def build(shared_uid: bool = False) -> Program:
    """The filter, compiled by libseccomp; raises ``OSError``/``RuntimeError``/``ImportError`` where unavailable.

    ``shared_uid``: snippets act on files as the trainer's own user, so ``METADATA`` calls are denied too."""
    import pyseccomp  # raises RuntimeError when libseccomp.so is missing

    deny = pyseccomp.ERRNO(errno.EPERM)
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)  # 32-bit syscalls on x86_64: no way around
    for name in DENIED + (METADATA if shared_uid else ()):
        try:
            filt.add_rule(deny, name)
        except OSError:  # a call this libseccomp does not know (newer than it): nothing to deny
            continue
    for flag in NAMESPACE_FLAGS:  # clone with any CLONE_NEW* flag; plain fork and threads stay allowed
        filt.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")  # flags hide in a struct: glibc falls back to clone
    no_family = pyseccomp.ERRNO(errno.EAFNOSUPPORT)
    filt.add_rule(no_family, "socket")  # any family, AF_UNIX included (see above)
    filt.add_rule(no_family, "socketpair", pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX))
    for name, index in SELF_ONLY:
        filt.add_rule(deny, name, pyseccomp.Arg(index, pyseccomp.NE, 0))
    # prlimit64(pid, resource, new, old): reading another's limits is harmless, setting them is not
    filt.add_rule(deny, "prlimit64", pyseccomp.Arg(0, pyseccomp.NE, 0), pyseccomp.Arg(2, pyseccomp.NE, 0))
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        bpf = f.read()
    return Program(bpf, pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "seccomp"))


def probe(shared_uid: bool = False) -> Program | None:
    """The filter if this host can build and install it (tried in a throwaway child), else None."""
    try:
        program = build(shared_uid)
    except (ImportError, OSError, RuntimeError):
        return None
    pid = os.fork()
    if pid == 0:
        try:
            program.install()
            os._exit(0)
        except BaseException:  # noqa: BLE001 - any failure means the layer is unavailable
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return program if status == 0 else None
