"""The zygote's scratch root and the removal of what snippets wrote: private, and impossible to defeat by shape.

A zygote works under a directory of its own, made fresh with mode 0700 under ``sandbox.scratch_root`` (a random
name, so a directory planted in a shared /tmp beforehand is never taken over), and deletes trees with
``remove_tree``, which walks one directory descriptor at a time: no recursion (a 3000-deep chain made
``shutil.rmtree`` raise ``RecursionError`` and the zygote die with every snippet in flight), no path longer than a
name (a deep chain passes PATH_MAX), never following a symlink, and opening up directories a snippet closed (mode
000). Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

ROOT_PREFIX = "torl-sandbox-"
_NEW_PREFIX = f".{ROOT_PREFIX}new-"  # a root while it is being locked: hidden from remove_stale_roots
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_root(parent: str) -> tuple[str, int]:
    """A new private scratch root under ``parent``: ``torl-sandbox-<pid>-<random>``, ours, 0711 (snippets with uids
    of their own may pass through it to their own directories, and list nothing), and the descriptor that holds an
    exclusive ``flock`` on it for as long as the zygote lives (keep it open; the kernel drops the lock when the
    zygote dies, however it dies).

    The lock, not the pid in the name, is what says the root is in use: a zygote in another PID namespace (a
    container sharing /tmp, a node of a test cluster) names its root with a pid that means another process, or
    none, here, and a pid check deleted such a live root under its snippets ("setup failed: FileNotFoundError").
    The root is locked under a name ``remove_stale_roots`` does not look at, then renamed (the lock follows the
    inode), so no sweep can see it unlocked."""
    new = tempfile.mkdtemp(prefix=f"{_NEW_PREFIX}{os.getpid()}-", dir=parent)  # O_EXCL, 0700
    fd = os.open(new, _DIR_FLAGS)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can hold it yet
    os.chmod(new, 0o711)
    root = os.path.join(parent, ROOT_PREFIX + os.path.basename(new).removeprefix(_NEW_PREFIX))
    os.rename(new, root)
    return os.path.realpath(root), fd


def remove_tree(path: str) -> bool:
    """Delete ``path`` and all under it; ``False`` (and the tree left in place) when part of it cannot be removed.

    Called once every process that could change the tree is dead; should one survive and move a directory, walking
    up through ``..`` would not return where the walk came down from, so each step up is checked against the
    directory's identity (device, inode) and the removal stops there instead of leaving the tree."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return True
    except OSError:  # a symlink or a file where a directory was expected
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    names: list[str] = []  # the way down from ``path``
    above: list[tuple[int, int]] = []  # (device, inode) of the directory each of ``names`` is in
    left: str | None = None  # the directory the walk just came up from, emptied
    try:
        while True:
            below = _clear_entries(fd)
            if below is not None and below == left:
                return False  # emptied but still not removable (a mount point, say): do not loop on it
            if below is not None:
                with contextlib.suppress(OSError):
                    os.chmod(below, 0o700, dir_fd=fd)  # a directory the snippet left without permissions
                child = os.open(below, _DIR_FLAGS, dir_fd=fd)
                st = os.fstat(fd)
                os.close(fd)
                fd, left = child, None
                names.append(below)
                above.append((st.st_dev, st.st_ino))
            elif not names:
                break
            else:
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd, left = parent, names.pop()
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != above.pop():
                    return False  # moved under the walk: not the way it came down
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def _clear_entries(fd: int) -> str | None:
    """Unlink every file and empty directory in ``fd``; the name of a non-empty directory to go into, else None."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                try:
                    os.rmdir(entry.name, dir_fd=fd)
                except OSError:
                    return entry.name
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=fd)
    return None


def remove_stale_roots(parent: str) -> None:
    """Delete scratch roots of zygotes that were SIGKILLed (they could not clean up after themselves).

    Only directories this user owns (never a lookalike another user planted) that no live zygote holds locked
    (``make_root``); the lock is held while the tree is removed."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(ROOT_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, _DIR_FLAGS)  # O_NOFOLLOW | O_DIRECTORY: a symlink or a file is skipped here
        except OSError:
            continue
        if not (os.fstat(fd).st_uid == os.geteuid() and _try_lock(fd)):  # another user's lookalike, or a live root
            os.close(fd)
            continue
        try:
            remove_tree(path)
        finally:
            os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take ``fd``'s exclusive lock if free: False while a live zygote holds it, wherever its pid lives."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
