"""The environments the sandbox is tested in, built from this root CI machine, and the zygote launcher for them.

1. root with CAP_SYS_ADMIN (the machine as it is);
2. root without CAP_SYS_ADMIN (``setpriv`` drops it, as a container does);
3. root without CAP_SYS_ADMIN under a seccomp profile like Docker's default, which blocks ``unshare``, ``setns``,
   ``mount`` and ``clone`` with namespace flags (``clone3`` answers ENOSYS, as there);
4. a non-root user;
5. a non-root user on a host without user namespaces (a seccomp rule denying ``CLONE_NEWUSER``, as
   ``kernel.unprivileged_userns_clone=0`` or an AppArmor policy would).

In 3-5 the zygote runs in a mount namespace where /root (mode 0700, home of the venv's base Python) is replaced by a
tmpfs showing only the Python installation, as a container image or a cluster node would have Python readable.
Run as a script, this module is the launcher: ``python sandbox_envs.py ENV UID -- ZYGOTE_ARGV...`` sets the
environment up and execs ``setpriv`` with the zygote's command (UID: the non-root user's, or "-" for root).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from torl.config import SandboxConfig
from torl.sandbox.client import Zygote

ROOT = Path(__file__).resolve().parents[2]
# The non-root user of environments 4 and 5 (no passwd entry needed), one per xdist worker: the tests tell their
# processes by uid (strays, RLIMIT_NPROC's count), and the other worker's sandbox tests run at the same time.
TEST_UID = 64231 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
# A non-root user no other test runs as, for a test that limits a user's processes (RLIMIT_NPROC counts every process
# of the uid on the machine).
ALONE_UID = 64230
NS_FLAGS = 0x7E020080  # every CLONE_NEW* flag, as Docker's profile tests them


@dataclass(frozen=True)
class Env:
    name: str
    drop_sys_admin: bool = False
    docker_seccomp: bool = False
    uid: int | None = None
    deny_userns: bool = False
    strict_starts: bool = True  # strict starts with full isolation here (else it refuses)

    @property
    def readable_python(self) -> bool:
        return self.docker_seccomp or self.uid is not None

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` (the zygote's command) run in this environment."""
        if self.name == "root":
            return argv
        return [sys.executable, __file__, self.name, "-" if self.uid is None else str(self.uid), "--", *argv]


ENVS = {
    e.name: e
    for e in (
        Env("root"),
        Env("root-no-cap-sys-admin", drop_sys_admin=True),
        Env("docker-seccomp", drop_sys_admin=True, docker_seccomp=True, strict_starts=False),
        Env("non-root", uid=TEST_UID),
        Env("non-root-no-userns", uid=TEST_UID, deny_userns=True, strict_starts=False),
    )
}


class EnvZygote(Zygote):
    """A zygote started in one of the test environments."""

    def __init__(self, cfg: SandboxConfig, env: Env) -> None:
        super().__init__(cfg)
        self.env = env

    def command(self) -> list[str]:
        return self.env.wrap(super().command())


def _expose_python() -> None:
    """In a new mount namespace: tmpfs over each non-traversable ancestor of the Python installation and of this
    checkout, those bound back in (so another uid can run the zygote and read its code)."""
    from torl.sandbox.child import CLONE_NEWNS, check, libc
    from torl.sandbox.namespaces import MS_PRIVATE, MS_REC, hidden_prefixes, reexpose

    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make-rprivate /")
    stage = tempfile.mkdtemp()
    reexpose(hidden_prefixes([sys.base_prefix, sys.prefix, str(ROOT)]), stage)
    os.rmdir(stage)


def _seccomp(env: Env) -> None:
    """The profile of environment 3 or 5, loaded in this process (it stays through exec and setuid)."""
    import pyseccomp

    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    deny = pyseccomp.ERRNO(errno.EPERM)
    filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    if env.docker_seccomp:
        for name in ("unshare", "setns", "mount", "umount2", "pivot_root", "keyctl", "add_key", "bpf"):
            filt.add_rule(deny, name)
        for bit in range(32):
            if NS_FLAGS >> bit & 1:
                filt.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, 1 << bit, 1 << bit))
    if env.deny_userns:
        for name in ("unshare", "clone"):
            filt.add_rule(deny, name, pyseccomp.Arg(0, pyseccomp.MASKED_EQ, 0x10000000, 0x10000000))
    filt.load()


def launch(name: str, uid: str, argv: list[str]) -> None:
    """Set environment ``name`` up in this (root) process, as ``uid`` where it is a non-root one (``wrap`` passes the
    Env's own, which a test may have replaced), and exec ``argv`` in it through ``setpriv``."""
    env = replace(ENVS[name], uid=None if uid == "-" else int(uid))
    if env.readable_python:
        _expose_python()
    if env.docker_seccomp or env.deny_userns:
        _seccomp(env)
    cmd = ["setpriv"]
    if env.drop_sys_admin:
        cmd += ["--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin"]
    if env.uid is not None:
        cmd += ["--reuid", str(env.uid), "--regid", str(env.uid), "--clear-groups"]
    os.execvp("setpriv", [*cmd, "--", *argv])


if __name__ == "__main__":
    launch(sys.argv[1], sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
