"""Where a process computes and how learner ranks talk: one rule for CPU and GPU runs (#28).

Every tensor that enters a collective must live on a device the process group has a backend for. The learner sums its
step metrics in a CPU tensor, and with ``learner.cpu_offload`` FSDP2 keeps gradients on the host (``clip_grad_norm_``
and ``full_tensor()`` then run collectives over CPU DTensors), so a GPU run's default group pairs NCCL for CUDA
tensors with gloo for CPU ones, as veRL, torchtune and slime initialise it; a plain ``nccl`` group raised "No backend
type associated with device type cpu" at the first optimizer step.

A config that asks for GPUs where torch cannot use CUDA (a CPU-only build, or a driver older than the build's CUDA)
is refused when the actor starts, naming the cause: the learner used to fall back to CPU and gloo without a word.
"""

from __future__ import annotations

# torch's device:backend form of a process group's backend: each tensor's collective goes to its device's backend.
CUDA_GROUP_BACKEND = "cpu:gloo,cuda:nccl"


class DeviceError(RuntimeError):
    """The config and this process's torch disagree on the device (raised at actor start, before any work)."""


def process_group_backend(requested: str, use_cuda: bool) -> str:
    """The learner's default process group backend for ``learner.backend`` (auto, gloo or nccl).

    ``nccl`` and ``auto`` on CUDA both get gloo beside NCCL for the CPU tensors that NCCL cannot carry.
    """
    if requested == "gloo":
        return "gloo"
    if use_cuda:
        return CUDA_GROUP_BACKEND
    if requested == "nccl":
        raise DeviceError("learner.backend=nccl needs GPUs (learner.num_gpus > 0): set learner.backend=auto or gloo")
    return "gloo"


def require_cuda(
    field: str, num_gpus: float, cuda_available: bool, torch_version: str, cuda_build: str | None
) -> None:
    """Refuse ``field`` (a config field such as ``learner.num_gpus``) > 0 where torch cannot use CUDA, naming why.

    ``cuda_build`` is ``torch.version.cuda``: None for a CPU-only build, which a GPU node gets from the cpu extra or
    PyTorch's CPU index; otherwise the GPU is not visible to this process or the driver is too old for the build
    (PyPI's torch 2.13.0 is built for CUDA 13, which needs driver R580 or newer).
    """
    if num_gpus <= 0 or cuda_available:
        return
    if cuda_build is None:
        cause = (
            f"torch {torch_version} is a CPU-only build; install the cuda extra "
            "(bash scripts/setup.sh on a node where nvidia-smi lists the GPUs)"
        )
    else:
        cause = (
            f"torch {torch_version} (built for CUDA {cuda_build}) finds no usable GPU: none is visible to this "
            f"process, or the NVIDIA driver is older than CUDA {cuda_build} needs (see nvidia-smi)"
        )
    raise DeviceError(f"{field}={num_gpus:g} but {cause}; or set {field}=0 to run on CPU")


def attention_implementation(requested: str, use_cuda: bool, flash_attn_installed: bool) -> str:
    """The Hugging Face ``attn_implementation`` the learner builds its model with (``learner.attn_implementation``).

    The learner packs sequences into one row with restarting position ids (``torl.rl.batching.pack``). On GPU, auto
    takes varlen flash attention where flash-attn is installed, else flex attention, whose block mask transformers
    builds from the position ids: both skip the cross-sequence blocks that sdpa's dense block-diagonal mask computes
    (at 16k-token rows of 2k-token sequences, about 8x the useful attention work). On CPU: sdpa, since torch's flex
    attention has no CPU backward and flash-attn needs CUDA.

    >>> attention_implementation("auto", use_cuda=True, flash_attn_installed=False)
    'flex_attention'
    """
    if requested == "auto":
        if not use_cuda:
            return "sdpa"
        return "flash_attention_2" if flash_attn_installed else "flex_attention"
    if requested in ("flex_attention", "flash_attention_2") and not use_cuda:
        raise DeviceError(
            f"learner.attn_implementation={requested} needs GPUs (learner.num_gpus > 0): torch's flex attention has no"
            " CPU backward and flash-attn needs CUDA; use auto or sdpa on CPU"
        )
    if requested == "flash_attention_2" and not flash_attn_installed:
        raise DeviceError(
            "learner.attn_implementation=flash_attention_2 but the flash-attn package is not installed here: install"
            " it, or use auto (flex attention on GPU)"
        )
    return requested
