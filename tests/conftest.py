"""Session fixtures shared by unit and integration tests: a tiny Qwen2 checkpoint built on disk in seconds."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init Qwen2 (hidden 64, 2 layers, head_dim 32, tied, fp32) + ToRL-ready tokenizer, loadable offline
    by transformers (AutoTokenizer / AutoModelForCausalLM) and vLLM. Built once per session (~1 s)."""
    from torl.modeling import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)
