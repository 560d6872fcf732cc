"""Where a run's checkpoints and files live for every node to reach (``trainer.storage_path``, as Ray Train's).

``trainer.storage_path`` empty: ``trainer.output_dir`` is the storage (one machine, or a shared disk mounted at the
same path everywhere); nothing here is used. Otherwise it is a shared absolute path or a URI that ``pyarrow.fs``
opens (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///abs/path``; S3 options in the query, e.g.
``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``; credentials from the usual variables, AWS_*).
Learner rank 0 still writes each checkpoint into ``output_dir`` (atomically, torl/infra/checkpoint.py), then uploads
it: every file first, the completion marker last, so a partial upload never looks complete. The driver lists, prunes
and resumes through the storage, and each learner rank downloads the checkpoint it loads when its node lacks it.
The run's small files (metrics.jsonl, ...) are uploaded beside the checkpoints and downloaded before a resume, so a
run continues on another node with its rows. A ``model.path`` URI is downloaded once per node into a local cache.

The layout (step directory names, the marker) is torl/infra/checkpoint.py's; this module only moves directories.
Pure logic over ``pyarrow.fs``: no Ray. Not here: when to save, upload or prune (actors/learner.py,
actors/learner_group.py, jobs/).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torl.config import ConfigError
from torl.infra import checkpoint as ckpt

log = logging.getLogger(__name__)

# The driver-written files of a run directory, uploaded at each checkpoint and at the end (jobs/tracking.py writes
# the first three and the W&B run id, torl/data/problem_rewards.py the fourth, jobs/train.py the curves).
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "wandb_run_id", "problem_rewards.jsonl", "curves.png")
# Variables pyarrow's filesystems read that hold a value (not a file of this machine): passed on to the actors
# that reach the storage when the driver has them set, on any cluster.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
# Variables that name files or settings of this machine: passed on only within the embedded local cluster (on
# other nodes the same names may not exist, or each node has its own, e.g. an instance role instead of a profile).
LOCAL_ENV = (
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
_SOURCE_FILE = ".torl-source.json"  # a cached model's listing at download time (a changed source is fetched again)


class StorageError(ConfigError):
    """The storage cannot be opened, read or written; the message names it and what failed."""


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (a pyarrow filesystem URI), False for a plain path."""
    return "://" in path


def credential_env(environ: Mapping[str, str], local_cluster: bool) -> dict[str, str]:
    """The storage variables set in ``environ`` that actors should get (see CREDENTIAL_ENV and LOCAL_ENV)."""
    names = CREDENTIAL_ENV + (LOCAL_ENV if local_cluster else ())
    return {k: environ[k] for k in names if environ.get(k)}


def _arrow_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (OSError, pa.ArrowException)


class Storage:
    """One storage location (a directory in a pyarrow filesystem) holding step directories and run files."""

    def __init__(self, uri: str) -> None:
        from pyarrow import fs as pafs

        self.uri = uri
        try:
            self.fs, root = pafs.FileSystem.from_uri(uri)
        except _arrow_errors() as exc:
            raise StorageError(
                "neither an absolute path nor a URI that pyarrow.fs opens (s3://bucket/prefix, gs://bucket/prefix,"
                f" file:///abs/path): {exc}"
            ) from exc
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # ---- names ------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root."""
        return "/".join([self.root, *parts])

    def location(self, *parts: str) -> str:
        """``parts`` under the root as a user reads it (the URI without its query: no endpoint or options)."""
        base = self.uri.split("?", 1)[0].rstrip("/") if is_uri(self.uri) else self.root
        return "/".join([base, *parts])

    def _fail(self, what: str, exc: BaseException) -> StorageError:
        return StorageError(f"storage {self.location()}: {what} failed: {exc}")

    # ---- checks ------------------------------------------------------------------------------------------------
    def probe(self) -> None:
        """Write, list and delete a small file at the root: a wrong URI, bucket, endpoint or credential fails here,
        at the start of a run, rather than at its first checkpoint."""
        name = f".torl-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(b"ok\n")
            self._list(self.root)
            self.fs.delete_file(self.path(name))
        except _arrow_errors() as exc:
            raise self._fail("writing a test file", exc) from exc

    def same_place(self, local_dir: str | Path) -> bool:
        """True when this storage is ``local_dir`` itself (storage_path set to output_dir: nothing to copy)."""
        return self.local and Path(self.root).resolve() == Path(local_dir).resolve()

    # ---- listing -----------------------------------------------------------------------------------------------
    def _list(self, path: str, recursive: bool = False) -> list[Any]:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))

    def _files(self, path: str) -> dict[str, Any]:
        """Every file under ``path``, by its path relative to ``path``."""
        from pyarrow import fs as pafs

        prefix = path.rstrip("/") + "/"
        return {i.path[len(prefix) :]: i for i in self._list(path, recursive=True) if i.type == pafs.FileType.File}

    def exists(self, *parts: str) -> bool:
        from pyarrow import fs as pafs

        try:
            return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File
        except _arrow_errors() as exc:
            raise self._fail(f"looking up {'/'.join(parts)}", exc) from exc

    def checkpoints(self) -> list[str]:
        """Names of the complete checkpoints (marker present), oldest first by step."""
        from pyarrow import fs as pafs

        try:
            dirs = [
                i.base_name
                for i in self._list(self.root)
                if i.type == pafs.FileType.Directory and ckpt.parse_step(i.base_name) is not None
            ]
            markers = self.fs.get_file_info([self.path(d, ckpt.MARKER) for d in dirs]) if dirs else []
        except _arrow_errors() as exc:
            raise self._fail("listing checkpoints", exc) from exc
        complete = [d for d, m in zip(dirs, markers, strict=True) if m.type == pafs.FileType.File]
        return sorted(complete, key=ckpt.parse_step)

    def latest(self) -> str | None:
        """The newest complete checkpoint's name, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def read_text(self, *parts: str) -> str:
        try:
            with self.fs.open_input_stream(self.path(*parts)) as f:
                return f.read().decode()
        except _arrow_errors() as exc:
            raise self._fail(f"reading {'/'.join(parts)}", exc) from exc

    def read_trainer_state(self, name: str) -> dict[str, Any]:
        """A stored checkpoint's trainer_state.json (torl/infra/checkpoint.py), read without downloading the
        checkpoint."""
        return json.loads(self.read_text(name, ckpt.STATE_FILE))

    # ---- changing ----------------------------------------------------------------------------------------------
    def _delete_checkpoint(self, name: str) -> None:
        """Marker first: a deletion stopped half-way leaves a directory that no listing takes as complete."""
        from pyarrow import fs as pafs

        if self.fs.get_file_info(self.path(name, ckpt.MARKER)).type == pafs.FileType.File:
            self.fs.delete_file(self.path(name, ckpt.MARKER))
        self.fs.delete_dir(self.path(name))

    def prune(self, keep_last: int) -> list[str]:
        """Delete all but the newest ``keep_last`` complete checkpoints, oldest first (0 = keep all)."""
        if keep_last <= 0:
            return []
        removed = self.checkpoints()[:-keep_last]
        for name in removed:
            try:
                self._delete_checkpoint(name)
            except _arrow_errors() as exc:
                raise self._fail(f"deleting old checkpoint {name}", exc) from exc
            log.info("removed old checkpoint %s", self.location(name))
        return removed

    def upload_checkpoint(self, local_dir: str | Path) -> str:
        """Copy the complete checkpoint ``local_dir`` to ``<root>/<its name>``: every file, then the marker. A stored
        checkpoint of the same name is deleted first (marker first). Returns the stored location."""
        local_dir = Path(local_dir)
        name = local_dir.name
        if ckpt.parse_step(name) is None or not ckpt.is_complete(local_dir):
            raise ValueError(f"{local_dir} is not a complete checkpoint directory")
        from pyarrow import fs as pafs

        files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        try:
            if self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound:
                self._delete_checkpoint(name)
            self.fs.create_dir(self.path(name), recursive=True)
            for rel in files:
                if rel != ckpt.MARKER:
                    self._put(local_dir / rel, self.path(name, rel))
            self._put(local_dir / ckpt.MARKER, self.path(name, ckpt.MARKER))
        except _arrow_errors() as exc:
            raise self._fail(f"uploading checkpoint {name}", exc) from exc
        log.info("uploaded checkpoint %s", self.location(name))
        return self.location(name)

    def download_checkpoint(self, name: str, local_root: str | Path) -> Path:
        """The stored checkpoint ``name`` as ``<local_root>/<name>``, downloaded unless a complete copy with the same
        trainer state is there already. Atomic (checkpoint.write_atomic), and one download per node even when
        several learner ranks ask at once (a lock file beside it)."""
        target = Path(local_root) / name
        if not self.exists(name, ckpt.MARKER):
            raise StorageError(f"{self.location(name)} is not a complete checkpoint (no {ckpt.MARKER} marker)")
        state = self.read_text(name, ckpt.STATE_FILE)
        with _locked(Path(local_root) / f".{name}.lock"):
            if ckpt.is_complete(target) and _read(target / ckpt.STATE_FILE) == state:
                return target
            self._download_tree(self.path(name), target, skip=(ckpt.MARKER,))
        log.info("downloaded checkpoint %s to %s", self.location(name), target)
        return target

    def upload_files(self, local_dir: str | Path, names: Iterable[str] = RUN_FILES) -> list[str]:
        """Copy each of ``names`` that exists in ``local_dir`` to the root (replacing it); returns those copied."""
        done = []
        for name in names:
            src = Path(local_dir) / name
            if src.is_file():
                try:
                    self._put(src, self.path(name))
                except _arrow_errors() as exc:
                    raise self._fail(f"uploading {name}", exc) from exc
                done.append(name)
        return done

    def download_files(self, local_dir: str | Path, names: Iterable[str] = RUN_FILES) -> list[str]:
        """Copy each of ``names`` stored at the root into ``local_dir`` (replacing a local copy: the stored one is
        the run's, a local one may be from an older stint on this node); returns those copied."""
        from pyarrow import fs as pafs

        names = list(names)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        try:
            infos = self.fs.get_file_info([self.path(n) for n in names])
            found = [n for n, i in zip(names, infos, strict=True) if i.type == pafs.FileType.File]
            for name in found:
                tmp = local_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    self._get(self.path(name), tmp)
                    os.replace(tmp, local_dir / name)
                finally:
                    tmp.unlink(missing_ok=True)
        except _arrow_errors() as exc:
            raise self._fail("downloading the run's files", exc) from exc
        return found

    # ---- models ------------------------------------------------------------------------------------------------
    def download_model(self, cache_root: str | Path, on_download: Callable[[], None] | None = None) -> Path:
        """The model directory at the root, downloaded into ``cache_root``/<digest of the URI>/<its name> unless
        that copy is complete and the stored files are unchanged (same names, sizes and times). The directory keeps
        the stored name: run identity (torl/infra/checkpoint.py) names a model by it."""
        name = self.root.rsplit("/", 1)[-1] or "model"
        digest = hashlib.sha256(self.uri.split("?", 1)[0].encode()).hexdigest()[:12]
        target = Path(cache_root) / digest / name
        try:
            files = self._files(self.root)
        except _arrow_errors() as exc:
            raise self._fail("listing the model's files", exc) from exc
        if "config.json" not in files:
            raise StorageError(f"model.path {self.location()}: no Hugging Face checkpoint (config.json) there")
        listing = json.dumps(
            sorted([rel, i.size, i.mtime_ns] for rel, i in files.items() if rel not in (ckpt.MARKER, _SOURCE_FILE))
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / f".{name}.lock"):
            if ckpt.is_complete(target) and _read(target / _SOURCE_FILE) == listing:
                return target
            if on_download is not None:
                on_download()
            self._download_tree(self.root, target, skip=(ckpt.MARKER, _SOURCE_FILE), note=(_SOURCE_FILE, listing))
        log.info("downloaded model %s to %s", self.location(), target)
        return target

    # ---- copying -----------------------------------------------------------------------------------------------
    def _put(self, src: Path, dst: str) -> None:
        from pyarrow import fs as pafs

        if self.local:  # object stores have no directories to make
            self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(src), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def _get(self, src: str, dst: Path) -> None:
        from pyarrow import fs as pafs

        pafs.copy_files(src, str(dst), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())

    def _download_tree(
        self, src: str, target: Path, skip: tuple[str, ...] = (), note: tuple[str, str] | None = None
    ) -> None:
        """Every file under ``src`` but ``skip`` into ``target``, atomically and with the marker last."""

        def write(tmp: Path) -> None:
            try:
                for rel in self._files(src):
                    if rel not in skip:
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        self._get(f"{src}/{rel}", tmp / rel)
            except _arrow_errors() as exc:
                raise self._fail(f"downloading {src}", exc) from exc
            if note:
                (tmp / note[0]).write_text(note[1])

        ckpt.write_atomic(target, write)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


@contextmanager
def _locked(lock_file: Path):
    """An exclusive lock between the processes of one node (learner ranks sharing a node download once)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_storage(uri: str, what: str = "trainer.storage_path") -> Storage:
    """Open ``uri`` and probe it (write, list, delete a test file); a clear StorageError naming ``what`` otherwise."""
    try:
        storage = Storage(uri)
        storage.probe()
    except StorageError as exc:
        raise StorageError(f"{what}={uri!r}: {exc}") from exc
    return storage


def run_storage(storage_path: str, output_dir: str) -> Storage | None:
    """The run's storage, or None when there is none beyond ``output_dir`` (storage_path empty or output_dir)."""
    if not storage_path:
        return None
    storage = Storage(storage_path)
    return None if storage.same_place(output_dir) else storage


def model_cache_dir() -> Path:
    """Where a ``model.path`` URI is downloaded on each node: ``$XDG_CACHE_HOME/torl/models`` (~/.cache/...)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torl" / "models"
