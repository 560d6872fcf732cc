"""Checkpoint directory layout: atomic writes, a completion marker, keep-last-k and RNG state helpers.

A checkpoint is a directory ``<output_dir>/step_000020/`` holding a Hugging Face model (``config.json``,
``model.safetensors``, tokenizer files; loadable by transformers and vLLM as is), ``optimizer.pt``, ``scheduler.pt``,
``rng.pt`` (one RNG state per learner rank) and ``trainer_state.json`` (caller's extra state: step, data position).
It is written into a hidden temporary sibling, the marker file ``COMPLETE`` is written last, and the directory is
renamed into place: a crash mid-save leaves no directory that looks complete, and a directory without the marker is
ignored by ``latest_checkpoint``.

Not here: gathering sharded state (``actors/learner.py``); deciding when to save (``jobs/loop.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    """The directory name of the checkpoint of ``step`` (the same locally and in storage, torl/infra/storage.py)."""
    return f"step_{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint directory named ``name``, or None for any other name (temporary ones included)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def step_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(output_dir) / step_name(step)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (by step number)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = parse_step(p.name)
        if step is not None and p.is_dir() and is_complete(p):
            found.append((step, p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None. Incomplete and temporary directories are ignored."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 = keep all); returns what was removed."""
    if keep_last <= 0:
        return []
    removed = list_checkpoints(output_dir)[:-keep_last]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed old checkpoint %s", p)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: str | Path, write_contents: Callable[[Path], None]) -> Path:
    """Call ``write_contents(tmp_dir)``, write the marker, then rename ``tmp_dir`` to ``target``.

    An existing ``target`` (a re-save of the same step) is replaced only after the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_contents(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        (tmp / MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_trainer_state(path: Path, extra: dict[str, Any]) -> None:
    try:
        text = json.dumps(extra, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"checkpoint extra state must be JSON-serialisable: {exc}") from exc
    (path / STATE_FILE).write_text(text + "\n")


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    return json.loads((path / STATE_FILE).read_text())


def get_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and CUDA when present) generator states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_identity(config: dict[str, Any], model_path: str | Path, tokenizer_path: str | Path) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it, as flat ``{field: value}``.

    The model by its directory name and its ``config.json`` (not its path: a moved checkout is the same run), the
    tokenizer by its files' digests, the whole algorithm section, and what positions the data sampler: a resumed
    sampler state means nothing over other data, batches or seeds. Everything else (steps, logging, resources,
    rollout engine settings) may change between a run and its resume.
    """
    model, tok = Path(model_path), Path(tokenizer_path)
    identity: dict[str, Any] = {
        "model": model.resolve().name,
        "model config.json": _file_digest(model / "config.json"),
        "tokenizer.json": _file_digest(tok / "tokenizer.json"),
        "tokenizer vocab.json": _file_digest(tok / "vocab.json"),
    }
    identity.update({f"algo.{k}": v for k, v in sorted(config["algo"].items())})
    for key in ("train_files", "batch_size", "seed", "shuffle"):
        identity[f"data.{key}"] = config["data"][key]
    identity["rollout.n"] = config["rollout"]["n"]
    return json.loads(json.dumps(identity))  # as it reads back from trainer_state.json (tuples become lists)


def identity_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each field where a checkpoint's run and this run differ, as ``field: checkpoint X, now Y``."""
    return [
        f"{key}: checkpoint {saved.get(key)!r}, now {now.get(key)!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]
