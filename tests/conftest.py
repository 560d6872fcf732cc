"""Session fixtures shared by unit and integration tests: a tiny Qwen2 checkpoint built on disk in seconds."""

import os
from pathlib import Path

import pytest

# One intra-op thread in the test process and the processes it starts: on this 2-core machine, with vLLM or the
# sandbox busy on the other core, two torch threads ran ~7x slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


REPO = Path(__file__).resolve().parents[1]
TEST_RECIPE = REPO / "configs" / "base_model_test.yaml"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The seconds-to-build variant of the base-model recipe (configs/base_model_test.yaml): a Qwen2 with hidden 64,
    2 layers, head_dim 32, tied embeddings, fp32, briefly trained on ToRL-format traces, and its tokenizer. Loads
    offline in transformers (AutoTokenizer / AutoModelForCausalLM) and vLLM. Built once per session."""
    from torl.models.pretrain import build_base_model, load_recipe

    out = tmp_path_factory.mktemp("tiny_model") / "model"
    path, _ = build_base_model(load_recipe([str(TEST_RECIPE)], [f"output_dir={out}", "threads=1"]))
    return path


# The suite runs on two xdist workers, each taking whole modules (``--dist loadfile``: a module's engine, Serve app or
# training run is started once) in the order collected (``--no-loadscope-reorder``; xdist would otherwise put the
# modules with the most tests first). Longest first, so neither worker is left with a 5-minute module at the end while
# the other idles: seconds per module, one worker, clone of 03056f3 (docs/testing.md). Unlisted modules (the unit
# tests, the quick integration ones) follow in their usual order.
LONGEST_FIRST = [
    "test_faults.py",  # 289 s
    "test_train.py",  # 167
    "test_cluster_job.py",  # 154
    "test_benches.py",  # 107
    "test_selective.py",  # 72
    "test_recovery.py",  # 59
    "test_storage_s3.py",  # 56
    "test_sandbox_hostile.py",  # 54
    "test_serve.py",  # 53
    "test_sandbox_between.py",  # 51
    "test_serve_load.py",  # 49
    "test_eval.py",  # 38
    "test_learning.py",  # 37
    "test_base_model.py",  # 29
    "test_generator.py",  # 28
    "test_weight_sync.py",  # 26
    "test_prepare_data.py",  # 24
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests keep their order
