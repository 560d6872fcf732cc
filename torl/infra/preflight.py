"""Preflight: will this config fit the hardware? Memory, disk and device counts, estimated before any actor starts.

A learner out of memory after the engines were built and a first batch sampled, a checkpoint that fills the disk at
step 20, or Ray waiting forever for GPUs the cluster does not have all cost far more than arithmetic on the config
and the model's shape. ``check`` turns (config, model shape, hardware) into rows of need vs have; jobs print them as a
table and stop on an error, whose message names the config field to change. A warning (vLLM holding fewer than
``max_num_seqs`` full-length sequences: it preempts and recomputes) prints and lets the run start.

Sizes are GiB (2^30 bytes), written GB as torch and vLLM do. The estimates aim a little high; each formula's
docstring says what it counts and where its constants come from.

Not here: the byte estimates (``torl/infra/model_sizes.py``), detecting the hardware (``torl/infra/hardware.py``), Ray
(callers pass its resource totals as a dict), when to run (``jobs/setup_run.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torl.config import Config, ConfigError
from torl.infra.hardware import MIN_DRIVER_BRANCH, Hardware
from torl.infra.model_sizes import (
    GiB,
    LearnerMemory,
    ModelShape,
    checkpoint_bytes,
    dtype_bytes,
    learner_memory,
    micro_batch_tokens,
    weight_file_bytes,
)

# Per GPU process: CUDA context, cuBLAS and NCCL workspaces (0.5-1.5 GiB on recent GPUs and drivers).
CUDA_CONTEXT = 1.0 * GiB


class PreflightError(ConfigError):
    """The config will not fit the hardware; the message names the fields to change."""


def _gb(x: float) -> str:
    """Bytes as GiB: one decimal, or two significant digits below 0.1 (the CPU presets' small models)."""
    gib = x / GiB
    return f"{gib:.1f}" if gib >= 0.1 or gib == 0 else f"{gib:.2g}"


# ---------------------------------------------------------------------------------------------------------------
# Rows and the report


@dataclass(frozen=True)
class Row:
    """One check: ``need`` against ``have`` (None = unknown, not checked); ``fix`` names what to change."""

    what: str
    need: float
    have: float | None
    detail: str = ""
    fix: str = ""
    level: Literal["error", "warning"] = "error"
    unit: str = "GB"

    @property
    def status(self) -> str:
        if self.have is None:
            return "?"
        if self.need <= self.have + 1e-9:
            return "ok"
        return "FAIL" if self.level == "error" else "warn"

    def message(self) -> str:
        have = "unknown" if self.have is None else self.fmt(self.have)
        return f"{self.what}: need {self.fmt(self.need)} {self.unit}, have {have}: {self.fix}"

    def fmt(self, x: float) -> str:
        return _gb(x * GiB) if self.unit == "GB" else f"{x:g}"


@dataclass(frozen=True)
class Report:
    title: str
    rows: list[Row]

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def table(self) -> str:
        lines = [self.title, f"  {'check':<34} {'need':>8} {'have':>8}  {'status':<6} how"]
        for r in self.rows:
            have = "-" if r.have is None else r.fmt(r.have)
            lines.append(f"  {r.what:<34} {r.fmt(r.need):>8} {have:>8}  {r.status:<6} {r.detail}")
        return "\n".join(lines)

    def raise_on_failure(self) -> None:
        if self.failures:
            raise PreflightError(
                "this config will not fit (preflight estimates, table above):\n"
                + "\n".join(f"  - {r.message()}" for r in self.failures)
            )


# ---------------------------------------------------------------------------------------------------------------
# Actor counts: the one rule for what the actors ask Ray for (jobs/setup_run.py check_resources uses it too)


def actor_resources(cfg: Config, learner: bool = True) -> dict[str, float]:
    """CPUs and GPUs the actors request; ``learner=False`` counts only the rollout actors (evaluation)."""
    sandbox = cfg.sandbox.num_workers * cfg.sandbox.num_cpus if cfg.tool.enabled else 0.0
    learners = cfg.learner.num_workers if learner else 0
    ro, lc = cfg.rollout, cfg.learner
    return {
        "CPU": ro.num_generators * ro.num_cpus + learners * lc.num_cpus + sandbox,
        "GPU": ro.num_generators * ro.num_gpus + learners * lc.num_gpus,
    }


def resource_rows(cfg: Config, available: Mapping[str, float], learner: bool = True) -> list[Row]:
    """The actors' CPU and GPU requests against a cluster's totals: Ray would wait forever for what is missing."""
    need = actor_resources(cfg, learner)
    fix = {
        "CPU": "lower rollout/learner/sandbox num_cpus or rollout.num_generators/learner.num_workers, or give the "
        "local cluster more logical CPUs with ray.num_cpus=N",
        "GPU": "lower rollout/learner num_gpus or rollout.num_generators/learner.num_workers",
    }
    ro, lc = cfg.rollout, cfg.learner
    detail = {
        "CPU": f"{ro.num_generators} generators x {ro.num_cpus:g} + {lc.num_workers if learner else 0} learners x "
        f"{lc.num_cpus:g} + sandbox {cfg.sandbox.num_workers if cfg.tool.enabled else 0} x {cfg.sandbox.num_cpus:g}",
        "GPU": f"{ro.num_generators} generators x {ro.num_gpus:g} + {lc.num_workers if learner else 0} learners x "
        f"{lc.num_gpus:g}",
    }
    return [
        Row(f"{kind}s for the actors", need[kind], float(available.get(kind, 0.0)), detail[kind], fix[kind], unit=kind)
        for kind in ("GPU", "CPU")
    ]


def device_rows(cfg: Config, hw: Hardware, learner: bool = True) -> list[Row]:
    """Whether this torch can drive this machine's GPUs, and whether the actors ask for all the GPUs there are.

    Checked only where this machine has an NVIDIA driver (a GPU node; a head node without GPUs or a laptop running
    preflight.only says nothing about the workers): with GPUs requested, a CPU-only torch build fails, and so does a
    driver below the branch torch's CUDA release needs (the actors would find no CUDA and refuse at start, after Ray
    placed them). Fewer GPUs used than the cluster offers is a warning: the run works, on part of the node.
    """
    used = actor_resources(cfg, learner)["GPU"]
    rows = []
    if used > 0 and hw.nvidia_driver is not None:
        have = int(hw.nvidia_driver.split(".")[0])
        if hw.torch_cuda is None:
            what, need, detail = "torch CUDA build for the driver", 1, f"driver {hw.nvidia_driver}, torch CPU-only"
            fix = "install the cuda extra (bash scripts/setup.sh on this node), or set rollout/learner num_gpus=0"
            have = 0
        else:
            cuda_major = int(hw.torch_cuda.split(".")[0])
            need = MIN_DRIVER_BRANCH.get(cuda_major, 0)
            what = f"NVIDIA driver for CUDA {hw.torch_cuda}"
            detail = f"driver {hw.nvidia_driver}; CUDA {cuda_major}.x needs branch {need}+"
            fix = (
                f"upgrade the NVIDIA driver to branch {need} or newer, or install torch and vLLM built for the CUDA "
                "release this driver supports (docs/platform-notes.md §15)"
            )
        rows.append(Row(what, need, have, detail, fix, unit="branch" if hw.torch_cuda else "build"))
    if 0 < hw.gpus and used < hw.gpus:
        rows.append(
            Row(
                "GPUs the actors use",
                hw.gpus,
                used,
                f"{hw.gpus - used:g} of the cluster's {hw.gpus} GPUs stay idle",
                "raise rollout.num_generators or learner.num_workers (or their num_gpus) to use them",
                level="warning",
                unit="GPU",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Learner GPU memory


def _learner_fixes(cfg: Config) -> str:
    lc = cfg.learner
    fixes = []
    if not lc.gradient_checkpointing:
        fixes.append("learner.gradient_checkpointing=true")
    if hasattr(lc, "logprob_chunk_tokens") and lc.logprob_chunk_tokens == 0:
        fixes.append("learner.logprob_chunk_tokens=1024")
    if not lc.cpu_offload and lc.num_gpus > 0:
        fixes.append("learner.cpu_offload=true")
    fixes.append(f"a smaller learner.micro_batch_tokens (now {lc.micro_batch_tokens})")
    fixes.append(f"more learner.num_workers to shard over (now {lc.num_workers})")
    return "set " + ", or ".join(fixes)


def learner_gpu_rows(cfg: Config, mem: LearnerMemory, hw: Hardware) -> list[Row]:
    lc = cfg.learner
    if lc.num_gpus == 0:
        return []
    budget = hw.gpu_memory_gb * min(lc.num_gpus, 1.0) if hw.gpu_memory_gb else None
    states = 0.0 if lc.cpu_offload else mem.states
    tokens = f"{micro_batch_tokens(cfg)} tokens" + (", checkpointed" if lc.gradient_checkpointing else "")
    chunk = getattr(lc, "logprob_chunk_tokens", 0)
    detail = (
        f"states {'on host' if lc.cpu_offload else _gb(states)} + FSDP working set {_gb(mem.gathered)} + activations "
        f"{_gb(mem.activations)} ({tokens}) + log-prob head {_gb(mem.head)} "
        f"({f'{chunk}-token chunks' if chunk else 'unchunked'}) + CUDA {_gb(CUDA_CONTEXT)}"
    )
    return [
        Row("learner GPU per rank", (CUDA_CONTEXT + states + mem.compute) / GiB, budget, detail, _learner_fixes(cfg)),
        Row(
            "learner GPU at model load",
            (CUDA_CONTEXT + mem.load) / GiB,
            budget,
            "fp32 shards, plus the one unit being sharded (the whole fp32 model when not sharded)",
            "GPUs with more memory, or a smaller model.path",
        ),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Engine memory


def engine_rows(cfg: Config, shape: ModelShape, hw: Hardware) -> list[Row]:
    """Each vLLM engine's weights and KV cache on one of its GPUs (or in host memory on CPU).

    KV bytes per token = 2 (K, V) * layers * KV heads (split over tensor parallel) * head_dim * dtype bytes; a
    sequence holds max_model_len tokens rounded up to whole blocks. Available for KV on a GPU = gpu_memory_utilization
    * GPU memory - the weights in the engine dtype (vLLM also reserves its profiled activation peak: the figure is an
    upper bound); on CPU it is rollout.engine.cpu_kvcache_gb. Fewer than max_num_seqs full-length sequences fitting
    is a warning (vLLM preempts and recomputes); one not fitting is an error.
    """
    ro, e = cfg.rollout, cfg.rollout.engine
    nbytes = dtype_bytes(cfg.model.dtype, "model.dtype")
    tp = e.tensor_parallel_size
    rows: list[Row] = []
    if ro.num_gpus > 0:
        rows.append(
            Row(
                "GPUs per generator",
                tp,
                ro.num_gpus,
                f"rollout.engine.tensor_parallel_size {tp}",
                "set rollout.num_gpus to rollout.engine.tensor_parallel_size",
                unit="GPU",
            )
        )
        usable = e.gpu_memory_utilization * hw.gpu_memory_gb * GiB if hw.gpu_memory_gb else None
        weights = shape.params * nbytes / tp
        rows.append(
            Row(
                "engine weights per GPU",
                weights / GiB,
                None if usable is None else usable / GiB,
                f"{cfg.model.dtype}, tensor parallel {tp}; usable = {e.gpu_memory_utilization:g} x GPU memory",
                "raise rollout.engine.gpu_memory_utilization or rollout.engine.tensor_parallel_size (and "
                "rollout.num_gpus with it)",
            )
        )
        kv_budget = None if usable is None else max(usable - weights, 0.0)
        where = "rollout.engine.gpu_memory_utilization or rollout.engine.tensor_parallel_size"
    else:
        kv_budget = e.cpu_kvcache_gb * GiB
        where = "rollout.engine.cpu_kvcache_gb"
    per_token = shape.kv_bytes_per_token(nbytes, tp)
    seq = math.ceil(cfg.model.max_model_len / e.block_size) * e.block_size * per_token
    if kv_budget is None:
        fits = "unknown how many"
    elif kv_budget >= e.max_num_seqs * seq:
        fits = "all"
    else:
        fits = f"{int(kv_budget // seq)}"
    rows += [
        Row(
            "engine KV, one sequence",
            seq / GiB,
            None if kv_budget is None else kv_budget / GiB,
            f"{cfg.model.max_model_len} tokens x {per_token / 1024:g} KiB/token",
            f"raise {where}, or lower model.max_model_len",
        ),
        Row(
            "engine KV, max_num_seqs sequences",
            e.max_num_seqs * seq / GiB,
            None if kv_budget is None else kv_budget / GiB,
            f"{fits} of rollout.engine.max_num_seqs={e.max_num_seqs} fit at full length"
            + ("" if fits == "all" else "; vLLM preempts the rest"),
            f"raise {where}, or lower rollout.engine.max_num_seqs",
            level="warning",
        ),
    ]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Host memory and disk


def _per_node(count: int, each: float, hw: Hardware) -> int:
    """How many of ``count`` actors asking ``each`` GPUs share a node (all of them when they ask none)."""
    if each <= 0 or not hw.gpus_per_node:
        return count
    return max(1, min(count, int(hw.gpus_per_node / each)))


def host_row(cfg: Config, shape: ModelShape, mem: LearnerMemory, hw: Hardware) -> Row:
    """Peak RAM of one node: the larger of start-up (every learner rank there loads the full fp32 model) and steady
    state (offloaded or CPU learner states, plus rank 0's full gather for a checkpoint, 12 bytes/param, or for a
    file-route weight push: an fp32 state dict and each generator's engine-dtype copy), plus CPU engines' weights
    and KV cache."""
    lc, ro = cfg.learner, cfg.rollout
    ranks = _per_node(lc.num_workers, lc.num_gpus, hw)
    gens = _per_node(ro.num_generators, ro.num_gpus, hw)
    on_host = (mem.states + (mem.compute if lc.num_gpus == 0 else 0.0)) if lc.cpu_offload or lc.num_gpus == 0 else 0.0
    save = checkpoint_bytes(shape) if cfg.trainer.save_every else 0.0
    file_route = getattr(ro, "weight_sync", "file") == "file"
    sync = 4 * shape.params + gens * weight_file_bytes(cfg, shape) if file_route else 0.0
    engines = 0.0
    if ro.num_gpus == 0:
        engines = gens * (shape.params * dtype_bytes(cfg.model.dtype, "model.dtype") + ro.engine.cpu_kvcache_gb * GiB)
    need = max(ranks * mem.load, ranks * on_host + max(save, sync)) + engines
    detail = (
        f"max(load {ranks} x {_gb(mem.load)}, learner {ranks} x {_gb(on_host)} + gather {_gb(max(save, sync))})"
        + (f" + {gens} CPU engines {_gb(engines)}" if engines else "")
    )
    fix = "lower learner.num_workers per node" + (", or learner.cpu_offload=false" if lc.cpu_offload else "")
    if engines:
        fix += ", or lower rollout.engine.cpu_kvcache_gb or rollout.num_generators"
    return Row("host memory per node", need / GiB, hw.host_memory_gb or None, detail, fix)


def disk_rows(
    cfg: Config, shape: ModelShape, hw: Hardware, existing_checkpoints: int = 0, total_steps: int = 0
) -> list[Row]:
    """Checkpoints under trainer.output_dir: keep_last of them plus the one being written before the oldest goes
    (fewer to add when some are there already); weight files of a node's generators (file route) in its weight dir."""
    tc, ro = cfg.trainer, cfg.rollout
    rows = []
    if tc.save_every:
        size = checkpoint_bytes(shape)
        kept = tc.keep_last + 1 if tc.keep_last else max(total_steps // tc.save_every, 1)
        count = max(kept - existing_checkpoints, 1)
        rows.append(
            Row(
                "disk: checkpoints",
                count * size / GiB,
                hw.free_disk_gb.get(tc.output_dir),
                f"{count} x {_gb(size)} (fp32 weights + AdamW moments) under {tc.output_dir}",
                "free space under trainer.output_dir or point it elsewhere, or lower trainer.keep_last",
                level="error" if tc.keep_last or total_steps else "warning",
            )
        )
    if getattr(ro, "weight_sync", "file") == "file":
        gens = _per_node(ro.num_generators, ro.num_gpus, hw)
        rows.append(
            Row(
                "disk: weight files (file route)",
                gens * weight_file_bytes(cfg, shape) / GiB,
                hw.free_disk_gb.get(hw.weight_dir),
                f"{gens} generators x {_gb(weight_file_bytes(cfg, shape))} in {hw.weight_dir}",
                f"free space in {hw.weight_dir}, or rollout.weight_sync=collective",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def check(
    cfg: Config,
    shape: ModelShape,
    hw: Hardware,
    *,
    existing_checkpoints: int = 0,
    total_steps: int = 0,
) -> Report:
    """Every row for a training run of ``cfg`` on ``hw``; ``total_steps`` sizes trainer.keep_last=0 (keep all)."""
    mem = learner_memory(cfg, shape)
    rows = [
        *resource_rows(cfg, {"GPU": hw.gpus, "CPU": hw.cpus}),
        *device_rows(cfg, hw),
        *learner_gpu_rows(cfg, mem, hw),
        *engine_rows(cfg, shape, hw),
        host_row(cfg, shape, mem, hw),
        *disk_rows(cfg, shape, hw, existing_checkpoints, total_steps),
    ]
    title = (
        f"[torl] preflight: {_count(shape.params)}-param model (hidden {shape.hidden}, {shape.layers} layers, "
        f"vocab {shape.vocab}) on {hw.describe()}; estimates in GB (GiB)"
    )
    return Report(title, rows)
