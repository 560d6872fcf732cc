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
