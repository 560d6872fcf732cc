"""Where relative paths (models, run directories, the shared data) are anchored.

A job started with ``ray job submit --working-dir .`` runs in a temporary copy of the repo without its gitignored
``models/`` and ``runs/``; ``scripts/ray_cluster.sh submit`` passes the real checkout as ``TORL_HOME`` so relative
paths in configs still point at it. Without ``TORL_HOME`` the anchor is this checkout.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def home() -> Path:
    """The project checkout that relative paths refer to."""
    return Path(os.environ.get("TORL_HOME") or REPO)


def resolve(path: str | Path) -> Path:
    """``path`` if absolute, else relative to ``home()``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else home() / path


def weight_dir() -> str:
    """Where generators keep scratch files (the file route's weight file): /dev/shm when writable (RAM), else the
    temp dir."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
