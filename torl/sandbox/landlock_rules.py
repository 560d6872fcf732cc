"""Landlock rules for sandbox children: write only the snippet's own scratch, read only what Python needs.

Landlock (Linux 5.13+) lets an unprivileged process restrict itself, so it holds for non-root users and in
containers, where a uid of its own or a mount namespace may be unavailable. Each child gets a ruleset of its own, built
by the forker before the fork, and adds its scratch to it once that is mounted (a rule names an inode, and a fresh
tmpfs is a new one; a rule on the directory it covers would not count, since Landlock skips covered mount points),
then enforces it in 0.1 ms (docs/platform-notes.md §13). What a
snippet may open: the Python installation (read, execute), system directories (/usr, /lib*, /bin, /sbin, /etc),
the CPU list under /sys that ``os.cpu_count`` reads, a few character devices (/dev/null, /dev/urandom, ...), and its
scratch (everything). Not the home directory (``~/.netrc``, ``~/.ray``, ``~/.cache``), not the run's
output or checkpoints, not /tmp, /dev/shm or /proc. Where the kernel has them, TCP bind/connect are denied (ABI 4)
and the snippet can neither signal processes nor reach abstract UNIX sockets outside its own domain (ABI 6), so
``kill(-1)`` cannot reach the trainer even without a PID namespace.

Uses the ``landlockpy`` binding, which drops rights the running kernel does not know (best effort).
"""

from __future__ import annotations

import os
import sys

import landlockpy
from landlockpy import AccessFS, AccessNet, Ruleset, Scope, fs_for_abi

READ_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/sys/devices/system/cpu")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is off, missing or blocked (e.g. by a seccomp profile)."""
    try:
        return landlockpy.abi_version()
    except OSError:  # LandlockError is an OSError: EPERM where a seccomp profile blocks the calls
        return 0


def read_paths() -> list[str]:
    """Directories a snippet may read and execute from: the system's and this Python's installation."""
    pythons = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    return [p for p in (*READ_DIRS, *sorted(pythons)) if os.path.exists(p)]


def ruleset(readable: tuple[str, ...]) -> Ruleset:
    """A new ruleset with every rule but the scratch's: built by the forker for each child, before the fork (0.1 ms
    there, against 0.8 ms in the child, whose first touch of each page copies it)."""
    rules = Ruleset(
        handled_net=AccessNet.BIND_TCP | AccessNet.CONNECT_TCP,  # no port rule: all TCP is denied
        scoped=Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL,
    )
    read = AccessFS.READ_FILE | AccessFS.READ_DIR | AccessFS.EXECUTE
    for path in readable:
        rules.allow_path(path, read)
    for path in DEVICES:
        if os.path.exists(path):
            rules.allow_path(path, AccessFS.READ_FILE | AccessFS.WRITE_FILE | AccessFS.IOCTL_DEV)
    return rules


def restrict(rules: Ruleset, scratch: str) -> None:
    """Add the scratch (everything) to the child's own ``rules`` and restrict this process and what it starts; sets
    ``no_new_privs`` too. Irreversible; called in the child once its scratch is mounted or made."""
    rules.allow_path(scratch, fs_for_abi(rules.abi_version))
    rules.restrict()
    rules.close()
