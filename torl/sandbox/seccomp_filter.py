"""The project's own seccomp filter, applied in each sandbox child right before the snippet runs.

It allows every system call except those a math snippet never needs and an escape would: sockets other than
AF_UNIX (no network even without a network namespace), namespace and mount calls (``unshare``, ``setns``,
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


def build() -> Program:
    """The filter, compiled by libseccomp; raises ``OSError``/``RuntimeError``/``ImportError`` where unavailable."""
    import pyseccomp  # raises RuntimeError when libseccomp.so is missing

    deny = pyseccomp.ERRNO(errno.EPERM)
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)  # 32-bit syscalls on x86_64: no way around
    for name in DENIED:
        filt.add_rule(deny, name)
    for flag in NAMESPACE_FLAGS:  # clone with any CLONE_NEW* flag; plain fork and threads stay allowed
        filt.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")  # flags hide in a struct: glibc falls back to clone
    no_family = pyseccomp.ERRNO(errno.EAFNOSUPPORT)
    for name in ("socket", "socketpair"):
        filt.add_rule(no_family, name, pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX))
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        bpf = f.read()
    return Program(bpf, pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "seccomp"))


def probe() -> Program | None:
    """The filter if this host can build and install it (tried in a throwaway child), else None."""
    try:
        program = build()
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
