"""torl/infra/storage.py against a local pyarrow filesystem (file:// URIs): upload with the marker last, listing,
prune, download into a node-local cache, run files, model cache, probe errors and the variables passed to actors."""

import json

import pytest

from torl.infra import checkpoint as ckpt
from torl.infra.storage import RUN_FILES, Storage, StorageError, credential_env, open_storage, run_storage


def _save(root, step, payload=b"weights"):
    def write(tmp):
        (tmp / "model.safetensors").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "nested.txt").write_text("n")
        ckpt.write_trainer_state(tmp, {"step": step})

    return ckpt.write_atomic(ckpt.step_dir(root, step), write)


@pytest.fixture
def store(tmp_path):
    return open_storage(f"file://{tmp_path / 'bucket' / 'run'}")


def test_upload_list_latest_and_prune(tmp_path, store):
    local = tmp_path / "local"
    assert store.checkpoints() == [] and store.latest() is None
    for step in (2, 10, 4):
        assert store.upload_checkpoint(_save(local, step)) == f"file://{tmp_path}/bucket/run/step_{step:06d}"
    assert store.checkpoints() == ["step_000002", "step_000004", "step_000010"]  # by step, not upload order
    assert store.latest() == "step_000010"
    assert store.read_trainer_state("step_000004") == {"step": 4}
    stored = tmp_path / "bucket" / "run" / "step_000004"
    assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()) == sorted(
        ["COMPLETE", "model.safetensors", "sub/nested.txt", "trainer_state.json"]
    )
    assert store.prune(keep_last=2) == ["step_000002"]
    assert store.checkpoints() == ["step_000004", "step_000010"]
    assert not (tmp_path / "bucket" / "run" / "step_000002").exists()  # the whole directory
    assert store.prune(keep_last=0) == []


def test_partial_upload_is_never_listed(tmp_path, store):
    """A directory without the marker (an upload cut short, a prune cut short) is not a checkpoint."""
    store.upload_checkpoint(_save(tmp_path / "local", 1))
    partial = tmp_path / "bucket" / "run" / "step_000002"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    (tmp_path / "bucket" / "run" / "notes").mkdir()
    assert store.checkpoints() == ["step_000001"] and store.latest() == "step_000001"
    with pytest.raises(StorageError, match="no COMPLETE marker"):
        store.download_checkpoint("step_000002", tmp_path / "node2")
    assert store.prune(keep_last=1) == []  # never counted, never pruned as if it were one


def test_marker_is_uploaded_last(tmp_path, store, monkeypatch):
    order = []
    put = Storage._put
    monkeypatch.setattr(Storage, "_put", lambda self, src, dst: (order.append(src.name), put(self, src, dst)))
    store.upload_checkpoint(_save(tmp_path / "local", 3))
    assert order[-1] == "COMPLETE" and len(order) == 4


def test_failed_upload_leaves_nothing_complete(tmp_path, store, monkeypatch):
    store.upload_checkpoint(_save(tmp_path / "local", 5))  # an older copy of the same step is replaced
    put = Storage._put

    def failing(self, src, dst):
        if src.name == "trainer_state.json":
            raise OSError("connection reset")
        put(self, src, dst)

    monkeypatch.setattr(Storage, "_put", failing)
    with pytest.raises(StorageError, match="uploading checkpoint step_000005 failed: connection reset"):
        store.upload_checkpoint(_save(tmp_path / "local", 5, b"newer"))
    assert store.checkpoints() == []


def test_download_into_a_node_cache_once(tmp_path, store, monkeypatch):
    store.upload_checkpoint(_save(tmp_path / "local", 6, b"w6"))
    node = tmp_path / "node2" / "out"
    got = store.download_checkpoint("step_000006", node)
    assert got == node / "step_000006" and ckpt.is_complete(got)
    assert (got / "model.safetensors").read_bytes() == b"w6" and (got / "sub" / "nested.txt").read_text() == "n"
    assert ckpt.latest_checkpoint(node) == got
    assert [p.name for p in node.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []
    monkeypatch.setattr(Storage, "_get", lambda *a: pytest.fail("a complete local copy was downloaded again"))
    assert store.download_checkpoint("step_000006", node) == got


def test_stale_local_copy_is_replaced(tmp_path, store):
    """A local step directory of the same name but another trainer state (another run's) is not trusted."""
    store.upload_checkpoint(_save(tmp_path / "local", 7, b"stored"))
    node = tmp_path / "node"

    def other(tmp):
        (tmp / "model.safetensors").write_bytes(b"other")
        ckpt.write_trainer_state(tmp, {"step": 7, "other": True})

    ckpt.write_atomic(ckpt.step_dir(node, 7), other)
    got = store.download_checkpoint("step_000007", node)
    assert (got / "model.safetensors").read_bytes() == b"stored"


def test_run_files_round_trip(tmp_path, store):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "wandb_run_id").write_text("abc")
    (out / "unrelated.bin").write_text("x")
    assert store.upload_files(out) == ["metrics.jsonl", "wandb_run_id"]
    other = tmp_path / "other"
    (other).mkdir()
    (other / "metrics.jsonl").write_text("stale\n")
    assert store.download_files(other) == ["metrics.jsonl", "wandb_run_id"]
    assert (other / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in other.iterdir()) == ["metrics.jsonl", "wandb_run_id"]
    assert "metrics.jsonl" in RUN_FILES


def test_model_download_is_cached_until_the_source_changes(tmp_path, monkeypatch):
    src = tmp_path / "models" / "Tiny-Model"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (src / "model.safetensors").write_bytes(b"m1")
    store = Storage(f"file://{src}")
    got = store.download_model(tmp_path / "cache")
    assert got.name == "Tiny-Model" and (got / "model.safetensors").read_bytes() == b"m1"
    calls = []
    get = Storage._get
    monkeypatch.setattr(Storage, "_get", lambda self, s, d: (calls.append(s), get(self, s, d)))
    assert store.download_model(tmp_path / "cache") == got and calls == []
    (src / "model.safetensors").write_bytes(b"m2-longer")
    assert (store.download_model(tmp_path / "cache") / "model.safetensors").read_bytes() == b"m2-longer"
    with pytest.raises(StorageError, match="no Hugging Face checkpoint"):
        Storage(f"file://{tmp_path / 'models'}").download_model(tmp_path / "cache")


def test_bad_uris_fail_with_a_clear_message(tmp_path):
    with pytest.raises(StorageError, match="trainer.storage_path='nosuch://x/y'.*neither an absolute path"):
        open_storage("nosuch://x/y")
    with pytest.raises(StorageError, match="neither an absolute path"):
        open_storage("relative/path")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=r"storage .*/file/run: writing a test file failed"):
        open_storage(str(blocker / "run"))


def test_plain_path_and_same_place(tmp_path):
    s = open_storage(str(tmp_path / "shared"))
    assert s.local and s.location("step_000001") == f"{tmp_path}/shared/step_000001"
    assert [p.name for p in (tmp_path / "shared").iterdir()] == []  # the probe file is gone
    assert run_storage("", str(tmp_path)) is None
    assert run_storage(str(tmp_path / "out"), str(tmp_path / "out")) is None  # storage_path = output_dir
    assert run_storage(f"file://{tmp_path}/shared", str(tmp_path / "out")) is not None


def test_location_hides_the_query():
    s = Storage("s3://bucket/prefix?endpoint_override=127.0.0.1:9&scheme=http")
    assert s.root == "bucket/prefix" and s.location("step_000002") == "s3://bucket/prefix/step_000002"


def test_credential_env_passes_values_everywhere_and_paths_only_locally():
    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_PROFILE": "p",
        "HOME": "/root",
        "AWS_SHARED_CREDENTIALS_FILE": "/root/.aws/c",
        "AWS_SESSION_TOKEN": "",
    }
    assert credential_env(env, local_cluster=False) == {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    assert credential_env(env, local_cluster=True) == {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_PROFILE": "p",
        "AWS_SHARED_CREDENTIALS_FILE": "/root/.aws/c",
    }


def test_storage_uris_are_not_anchored_like_paths(monkeypatch, tmp_path):
    from jobs.setup_run import with_absolute_paths
    from torl.config_load import load_config

    monkeypatch.setenv("TORL_HOME", str(tmp_path))
    uri = "s3://bucket/models/Qwen?endpoint_override=h:1&scheme=http"
    cfg = with_absolute_paths(load_config([], [f"model.path={uri}", "trainer.storage_path=shared/run"]))
    assert cfg.model.path == uri and cfg.trainer.storage_path == f"{tmp_path}/shared/run"
    cfg = with_absolute_paths(load_config([], ["model.path=m", "trainer.storage_path=gs://b/run"]))
    assert cfg.model.path == f"{tmp_path}/m" and cfg.trainer.storage_path == "gs://b/run"
    assert with_absolute_paths(load_config([], [])).trainer.storage_path == ""
