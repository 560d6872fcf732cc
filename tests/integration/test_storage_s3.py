"""Checkpoints and run files in an S3 bucket (moto's S3 server on loopback), as a run over several nodes without a
shared disk keeps them (trainer.storage_path, torl/infra/storage.py).

One run of the tiny model stores its checkpoints (each with its marker, older ones pruned) and metrics.jsonl in the
bucket. A second start with another, empty output_dir (another node) and the model itself read from the bucket
resumes from the stored step, not step 0, ignoring a newer upload that was cut short (no marker), and every step's
row is kept once. A bucket that does not exist, an endpoint nobody listens on and a URI pyarrow does not know stop
the job at its start with one line.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import psutil
import pytest
from test_faults import _actor_processes  # this test cluster's actor processes (tests/integration is on sys.path)
from test_train import _args  # the training test's arguments

from jobs.train import main as train_main

BUCKET = "torl-test"


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free loopback port; yields its query string for pyarrow URIs."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?{query}&allow_bucket_creation=true")
    fs.create_dir(BUCKET)
    try:
        yield query
    finally:
        server.stop()


def _bucket(query: str):
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(f"s3://{BUCKET}?{query}")[0]


def _listing(fs, prefix: str) -> set[str]:
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{BUCKET}/{prefix}/") for i in infos if i.type == pafs.FileType.File}


def _watch_learner_env(name: str, seen: list[str]) -> threading.Thread:
    """Record variable ``name`` as a learner actor process of this cluster sees it (the first one found)."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not seen:
            for proc in _actor_processes("Learner"):
                try:
                    seen.append(proc.environ().get(name, "(unset)"))
                    return
                except psutil.Error:
                    continue
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _steps(text: str) -> list[int]:
    return [json.loads(line)["step"] for line in text.splitlines()]


def test_checkpoints_and_metrics_in_s3_resume_on_another_node(
    ray_cluster, tiny_model_dir, tmp_path, s3, capsys, monkeypatch
):
    from pyarrow import fs as pafs

    fs = _bucket(s3)
    storage = f"s3://{BUCKET}/runs/a?{s3}"
    common = ["trainer.val_every=0", "trainer.save_every=1", "trainer.keep_last=1", f"trainer.storage_path={storage}"]

    # Node 1: two steps, a checkpoint after each; the older one is pruned from the bucket (and from the node).
    # The learner gets the driver's credentials (this cluster started before they were set).
    node1 = tmp_path / "node1"
    seen: list[str] = []
    watcher = _watch_learner_env("AWS_ACCESS_KEY_ID", seen)
    assert train_main([*_args(tiny_model_dir, node1, 2, 0), *common]) == 0
    watcher.join(timeout=5)
    assert seen == ["testing"]
    files = _listing(fs, "runs/a")
    assert {"step_000002/COMPLETE", "step_000002/model.safetensors", "step_000002/trainer_state.json"} <= files
    assert not any(f.startswith("step_000001/") for f in files)  # pruned, whole
    assert {"metrics.jsonl", "samples.jsonl", "curves.png"} <= files
    assert _steps(_read(fs, "runs/a/metrics.jsonl")) == [0, 1, 2]
    assert "stored       s3://torl-test/runs/a/step_000002 (trainer.storage_path)" in capsys.readouterr().out
    assert sorted(p.name for p in node1.glob("step_*")) == ["step_000002"]

    # An upload cut short: every file of a newer step but its marker. Never resumed from.
    for name in files:
        if name.startswith("step_000002/") and not name.endswith("COMPLETE"):
            pafs.copy_files(f"{BUCKET}/runs/a/{name}", f"{BUCKET}/runs/a/step_000009/{name[12:]}", fs, fs)

    # The model from the bucket too: node 2 has neither the run's files nor the model.
    pafs.copy_files(str(tiny_model_dir), f"{BUCKET}/models/{tiny_model_dir.name}", pafs.LocalFileSystem(), fs)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "node2-cache"))
    node2 = tmp_path / "node2"
    model_uri = f"s3://{BUCKET}/models/{tiny_model_dir.name}?{s3}"
    assert train_main([*_args(tiny_model_dir, node2, 3, 0), *common, f"model.path={model_uri}"]) == 0
    out = capsys.readouterr().out
    assert "[torl] resumed from s3://torl-test/runs/a/step_000002 at step 2" in out
    assert f"downloading s3://torl-test/models/{tiny_model_dir.name} into" in out
    assert _steps((node2 / "metrics.jsonl").read_text()) == [0, 1, 2, 3]  # node 1's rows, then step 3, each once
    assert _steps(_read(fs, "runs/a/metrics.jsonl")) == [0, 1, 2, 3]
    state = json.loads(_read(fs, "runs/a/step_000003/trainer_state.json"))
    assert state["step"] == 3 and state["sampler"]["position"] == 3 * 4
    files = _listing(fs, "runs/a")
    assert "step_000003/COMPLETE" in files and not any(f.startswith("step_000002/") for f in files)
    assert "step_000009/COMPLETE" not in files  # still there, still not a checkpoint


def _read(fs, path: str) -> str:
    with fs.open_input_stream(f"{BUCKET}/{path}") as f:
        return f.read().decode()


def test_unusable_storage_stops_the_job_at_its_start(tiny_model_dir, tmp_path, s3, capsys):
    """Before Ray or any actor starts: the probe (write, list, delete a file) fails with the storage named."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cases = {
        f"s3://no-such-bucket/run?{s3}": "Bucket 'no-such-bucket' not found",
        f"s3://{BUCKET}/run?endpoint_override=127.0.0.1:{dead}&scheme=http": "Could not connect",
        "nosuch://bucket/run": "neither an absolute path nor a URI that pyarrow.fs opens",
    }
    for uri, why in cases.items():
        args = [*_args(tiny_model_dir, tmp_path / "run", 1, 0), f"trainer.storage_path={uri}"]
        assert train_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"[torl] config error: trainer.storage_path={uri!r}: ") and why in err, err
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
