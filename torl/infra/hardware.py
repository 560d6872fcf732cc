"""What the machine or cluster has: GPUs and their memory, CPUs, host memory per node, free disk, and the NVIDIA
driver against torch's CUDA build; ``preflight.*`` fields stand in for a cluster described on the command line.

Not here: what the run needs (``torl/infra/model_sizes.py``), need against have (``torl/infra/preflight.py``).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torl.config import Config
from torl.infra import paths
from torl.infra.model_sizes import GiB


@dataclass(frozen=True)
class Hardware:
    gpus: int  # in the cluster
    gpus_per_node: int
    gpu_memory_gb: float  # per GPU; 0 = unknown (GPU memory is then not checked)
    host_memory_gb: float  # per node
    cpus: float  # logical CPUs in the cluster, as Ray counts them
    free_disk_gb: Mapping[str, float] = field(default_factory=dict)  # free space at each path the run writes to
    weight_dir: str = "/dev/shm"  # where a generator writes its weight file (torl.infra.paths.weight_dir)
    # The installed torch's CUDA (torch.version.cuda; None = a CPU-only build) and this machine's NVIDIA kernel
    # driver ("535.104.05"; None = none here, e.g. a head node without GPUs: the driver is then not checked).
    torch_cuda: str | None = None
    nvidia_driver: str | None = None

    def describe(self) -> str:
        gpus = f"{self.gpus} GPUs" + (f" x {self.gpu_memory_gb:.0f} GB" if self.gpu_memory_gb else " (memory unknown)")
        nodes = math.ceil(self.gpus / self.gpus_per_node) if self.gpus_per_node else 1
        return f"{gpus}, {self.cpus:g} CPUs, {self.host_memory_gb:.0f} GB host memory per node ({nodes} node(s))"


def free_gb(path: str) -> float:
    """Free space of the filesystem ``path`` is (or will be) on: its nearest existing ancestor's."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / GiB


# NVIDIA's minimum Linux driver branch per CUDA major release (CUDA minor version compatibility;
# docs/platform-notes.md §15): a torch built for CUDA 13 does not start on a 535-570 driver, where
# torch.cuda.is_available() is simply False.
MIN_DRIVER_BRANCH = {11: 450, 12: 525, 13: 580}
DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


def parse_driver_version(text: str) -> str | None:
    """The kernel driver's version from ``/proc/driver/nvidia/version`` ("NVRM version: NVIDIA UNIX x86_64 Kernel
    Module  535.104.05  Sat Aug 19 ..." -> "535.104.05"); None when the text names none."""
    for line in text.splitlines():
        if line.startswith("NVRM version:"):
            for word in line.split():
                if word[:1].isdigit() and "." in word:
                    return word
    return None


def nvidia_driver() -> str | None:
    """This machine's NVIDIA driver version (None without the NVIDIA kernel module)."""
    try:
        return parse_driver_version(Path(DRIVER_VERSION_FILE).read_text())
    except OSError:
        return None


def detect_hardware(cfg: Config, ray_resources: Mapping[str, float] | None = None) -> Hardware:
    """This machine's hardware, Ray's CPU/GPU totals when a cluster is up, and ``preflight.*`` overrides on top.

    The driver may be a head node without GPUs, or one node of several: GPU memory and per-node host memory are
    then the overrides' to give.
    """
    import torch

    pf = cfg.preflight
    local_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ray_resources is not None:
        gpus, cpus = int(ray_resources.get("GPU", 0)), float(ray_resources.get("CPU", 0))
    else:
        gpus, cpus = pf.gpus or local_gpus, float(pf.cpus or cfg.ray.num_cpus or os.cpu_count() or 1)
    gpu_memory = pf.gpu_memory_gb or (torch.cuda.get_device_properties(0).total_memory / GiB if local_gpus else 0.0)
    host = pf.host_memory_gb or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    wdir = paths.weight_dir()
    return Hardware(
        gpus=gpus,
        gpus_per_node=pf.gpus_per_node or local_gpus or gpus,
        gpu_memory_gb=gpu_memory,
        host_memory_gb=host,
        cpus=cpus,
        free_disk_gb={p: free_gb(p) for p in (cfg.trainer.output_dir, wdir)},
        weight_dir=wdir,
        torch_cuda=torch.version.cuda,
        nvidia_driver=nvidia_driver(),
    )
