"""A learner's process group and device (torl/infra/devices.py, #28): CPU tensors beside NCCL, and no silent CPU
run."""

import pytest

from torl.infra.devices import (
    CUDA_GROUP_BACKEND,
    DeviceError,
    attention_implementation,
    process_group_backend,
    require_cuda,
)


def test_cuda_groups_carry_cpu_tensors_over_gloo():
    # A plain "nccl" group failed the first optimizer step on GPUs: the metrics all_reduce is a CPU tensor, and so
    # are the gradients under learner.cpu_offload.
    assert CUDA_GROUP_BACKEND == "cpu:gloo,cuda:nccl"
    assert process_group_backend("auto", use_cuda=True) == CUDA_GROUP_BACKEND
    assert process_group_backend("nccl", use_cuda=True) == CUDA_GROUP_BACKEND


def test_cpu_runs_use_gloo_and_refuse_nccl():
    assert process_group_backend("auto", use_cuda=False) == "gloo"
    assert process_group_backend("gloo", use_cuda=True) == "gloo"
    with pytest.raises(DeviceError, match="learner.backend=nccl needs GPUs"):
        process_group_backend("nccl", use_cuda=False)


def test_gpus_asked_for_without_cuda_fail_naming_the_cause():
    with pytest.raises(DeviceError, match=r"learner.num_gpus=1 but torch 2.13.0\+cpu is a CPU-only build"):
        require_cuda("learner.num_gpus", 1, False, "2.13.0+cpu", None)
    with pytest.raises(DeviceError, match=r"built for CUDA 13.0\) finds no usable GPU.*driver is older"):
        require_cuda("rollout.num_gpus", 0.5, False, "2.13.0", "13.0")


def test_cpu_configs_and_working_cuda_pass():
    require_cuda("learner.num_gpus", 0, False, "2.13.0+cpu", None)
    require_cuda("learner.num_gpus", 1, True, "2.13.0", "13.0")


def test_gpu_learners_attend_without_cross_sequence_blocks():
    # sdpa over a packed row computes every block of the row (dense block-diagonal mask): ~8x the useful work at
    # ToRL's lengths. GPUs get varlen flash attention where installed, else flex attention's block mask.
    assert attention_implementation("auto", use_cuda=True, flash_attn_installed=False) == "flex_attention"
    assert attention_implementation("auto", use_cuda=True, flash_attn_installed=True) == "flash_attention_2"
    assert attention_implementation("auto", use_cuda=False, flash_attn_installed=True) == "sdpa"
    assert attention_implementation("sdpa", use_cuda=True, flash_attn_installed=True) == "sdpa"


def test_attention_a_cpu_learner_cannot_train_with_is_refused():
    with pytest.raises(DeviceError, match="flex_attention needs GPUs.*no CPU backward"):
        attention_implementation("flex_attention", use_cuda=False, flash_attn_installed=False)
    with pytest.raises(DeviceError, match="flash-attn package is not installed"):
        attention_implementation("flash_attention_2", use_cuda=True, flash_attn_installed=False)
