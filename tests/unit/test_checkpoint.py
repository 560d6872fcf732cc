"""Atomic checkpoint directories, the completion marker, keep-last-k and RNG state round trips."""

import random

import numpy as np
import pytest
import torch

from torl.infra import checkpoint as ckpt


def _save(root, step, extra=None):
    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"weights")
        ckpt.write_trainer_state(tmp, extra or {"step": step})

    return ckpt.write_atomic(ckpt.step_dir(root, step), write)


def test_atomic_write_and_latest(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    p = _save(tmp_path, 20, {"step": 20, "data_pos": 7})
    assert p.name == "step_000020" and ckpt.is_complete(p)
    assert ckpt.read_trainer_state(p) == {"step": 20, "data_pos": 7}
    _save(tmp_path, 40)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000040"
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []  # no temporary leftovers


def test_crash_mid_save_leaves_nothing_that_looks_complete(tmp_path):
    _save(tmp_path, 1)

    def boom(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.write_atomic(ckpt.step_dir(tmp_path, 2), boom)
    assert not ckpt.step_dir(tmp_path, 2).exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    assert [x.name for x in tmp_path.iterdir()] == ["step_000001"]


def test_directory_without_marker_is_ignored(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "step_000005").mkdir()  # e.g. copied by hand, or written by an older crash
    (tmp_path / "notes").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    with pytest.raises(FileNotFoundError):
        ckpt.read_trainer_state(tmp_path / "step_000005")


def test_resave_replaces_and_prune_keeps_last_k(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s)
    _save(tmp_path, 4, {"step": 4, "again": True})
    assert ckpt.read_trainer_state(ckpt.step_dir(tmp_path, 4))["again"] is True
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step_000001", "step_000002"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert ckpt.prune_checkpoints(tmp_path, keep_last=0) == []


def test_extra_state_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        ckpt.write_atomic(tmp_path / "step_000001", lambda d: ckpt.write_trainer_state(d, {"x": object()}))
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_rng_state_round_trip():
    state = ckpt.get_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def _identity(tmp_path, **changes):
    from torl.config import to_dict
    from torl.config_load import load_config

    model = tmp_path / "Qwen-tiny"
    if not model.is_dir():
        model.mkdir()
        (model / "config.json").write_text('{"hidden_size": 64}')
        (model / "tokenizer.json").write_text('{"vocab": 1}')
    cfg = to_dict(load_config([], [f"{k}={v}" for k, v in changes.items()]))
    return ckpt.run_identity(cfg, model, model)


def test_run_identity_names_what_differs(tmp_path):
    base = _identity(tmp_path)
    assert ckpt.identity_differences(base, _identity(tmp_path)) == []
    assert ckpt.identity_differences(base, _identity(tmp_path, **{"trainer.total_steps": 99})) == []  # may change
    diffs = ckpt.identity_differences(base, _identity(tmp_path, **{"algo.clip_high": 0.28, "data.batch_size": 7}))
    assert diffs == ["algo.clip_high: checkpoint 0.2, now 0.28", "data.batch_size: checkpoint 128, now 7"]
    (tmp_path / "Qwen-tiny" / "tokenizer.json").write_text('{"vocab": 2}')
    assert [d.split(":")[0] for d in ckpt.identity_differences(base, _identity(tmp_path))] == ["tokenizer.json"]


def test_run_identity_survives_the_json_round_trip(tmp_path):
    identity = _identity(tmp_path, **{"data.train_files": "[a.parquet,b.parquet]"})
    ckpt.write_trainer_state(tmp_path, {"identity": identity})
    (tmp_path / ckpt.MARKER).write_text("ok\n")
    assert ckpt.identity_differences(ckpt.read_trainer_state(tmp_path)["identity"], identity) == []
