"""Preflight: will this config fit the hardware? Memory, disk and device counts, estimated before any actor starts.

A learner out of memory after the engines were built and a first batch sampled, a checkpoint that fills the disk at
step 20, or Ray waiting forever for GPUs the cluster does not have all cost far more than arithmetic on the config
and the model's shape. ``check`` turns (config, model shape, hardware) into rows of need vs have; jobs print them as a
table and stop on an error, whose message names the config field to change. A warning (vLLM holding fewer than
``max_num_seqs`` full-length sequences: it preempts and recomputes) prints and lets the run start.

Sizes are GiB (2^30 bytes), written GB as torch and vLLM do. These are estimates that aim a little high; each
formula's docstring says what it counts and where its constants come from.

Not here: Ray (callers pass its resource totals as a dict), when to run (``jobs/setup_run.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torl.config import Config, ConfigError
from torl.infra import paths

GiB = 2**30
# Per GPU process: CUDA context, cuBLAS and NCCL workspaces (0.5-1.5 GiB on recent GPUs and drivers).
CUDA_CONTEXT = 1.0 * GiB
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}

# config.json shape facts of models the GPU presets name but this repository does not ship, so a preset can be
# checked without the checkpoint (preflight.only, the tests); keyed by the checkpoint directory's name, lower case.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-math-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "intermediate_size": 8960,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-math-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    # configs/smollm2_cpu.yaml's model, converted on first use (jobs/convert_model.py)
    "smollm2-135m-instruct": {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}


class PreflightError(ConfigError):
    """The config will not fit the hardware; the message names the fields to change."""


def dtype_bytes(name: str, key: str) -> int:
    if name not in DTYPE_BYTES:
        raise ConfigError(f"{key}: unknown dtype {name!r}; one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _gb(x: float) -> str:
    """Bytes as GiB: one decimal, or two significant digits below 0.1 (the CPU presets' small models)."""
    gib = x / GiB
    return f"{gib:.1f}" if gib >= 0.1 or gib == 0 else f"{gib:.2g}"


# ---------------------------------------------------------------------------------------------------------------
# Model shape


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Qwen2/Llama family: GQA attention, SwiGLU MLP, RMSNorm), as config.json has it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False  # Qwen2 always has q/k/v biases; Llama has them (and an o_proj bias) with attention_bias
    o_bias: bool = False

    @classmethod
    def from_hf_config(cls, c: Mapping[str, Any]) -> ModelShape:
        heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
        qwen2 = c.get("model_type") == "qwen2"
        return cls(
            hidden=hidden,
            layers=int(c["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            intermediate=int(c["intermediate_size"]),
            vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or bool(c.get("attention_bias", False)),
            o_bias=not qwen2 and bool(c.get("attention_bias", False)),
        )

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden
        bias = (q + 2 * kv if self.qkv_bias else 0) + (self.hidden if self.o_bias else 0)
        return attn + bias + 3 * self.hidden * self.intermediate + 2 * self.hidden  # + gate/up/down, 2 norms

    @property
    def root_params(self) -> int:
        """Embedding, final norm and an untied lm_head: what FSDP's root unit holds besides the decoder layers."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def kv_bytes_per_token(self, nbytes: int, tensor_parallel: int = 1) -> int:
        """K and V of every layer for one token on one GPU; KV heads split over tensor-parallel ranks (at least 1)."""
        return 2 * self.layers * math.ceil(self.kv_heads / tensor_parallel) * self.head_dim * nbytes


def model_shape(path: str) -> ModelShape:
    """The shape from ``path``/config.json, else from ``KNOWN_SHAPES`` by the directory's name."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return ModelShape.from_hf_config(json.loads(config_file.read_text()))
    known = KNOWN_SHAPES.get(Path(path).name.lower()) if path else None
    if known is None:
        raise ConfigError(
            f"model.path {path!r}: no config.json there and not a known model name ({', '.join(KNOWN_SHAPES)}); "
            "the preflight needs the model's shape"
        )
    return ModelShape.from_hf_config(known)


# ---------------------------------------------------------------------------------------------------------------
# Hardware


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
# Learner memory


def activation_bytes(shape: ModelShape, tokens: int, nbytes: int, checkpointing: bool) -> float:
    """Activations kept for backward over one micro-batch of ``tokens`` packed tokens.

    Per layer, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1) count
    34 * s*b*h bytes in 16-bit (attention 11, MLP 19, norms 4), plus 5 * a*s^2*b for attention scores that sdpa's
    flash and memory-efficient kernels (CPU ones included in torch 2.13) never keep: measured on CPU at 4096 packed
    tokens, a layer added 45 MB where kept scores alone would be 268 MB. Their MLP's 19 assumes an intermediate of
    4h, so it is scaled by intermediate / 4h here (SwiGLU's gate adds about what their dropout masks, absent here,
    removed), and the whole by dtype / 2 bytes. With gradient checkpointing (per decoder layer) only each layer's
    input, tokens * h values, is kept, plus one layer's full activations while it is recomputed in backward. Plus
    the boolean block-diagonal mask Hugging Face builds for a packed row: tokens^2 bytes, once.
    """
    per_layer = tokens * (15 * shape.hidden + 19 * shape.intermediate / 4) * nbytes / 2
    kept = (shape.layers * tokens * shape.hidden * nbytes + per_layer) if checkpointing else shape.layers * per_layer
    return kept + tokens**2


def micro_batch_tokens(cfg: Config) -> int:
    """The most tokens one forward/backward holds (torl.rl.batching): learner.micro_batch_tokens of packed sequences,
    but no more than a rank's share of a mini-batch, and a longer sequence in a micro-batch of its own."""
    seq = cfg.prompt.max_prompt_tokens + cfg.rollout.max_response_tokens
    prompts = cfg.learner.mini_batch_prompts or cfg.data.batch_size
    share = math.ceil(prompts * cfg.rollout.n / cfg.learner.num_workers) * seq
    return max(min(cfg.learner.micro_batch_tokens, share), seq)


def head_bytes(shape: ModelShape, tokens: int, chunk: int, nbytes: int) -> float:
    """The log-prob step's [tokens, vocab] tensors (the largest single allocation at Qwen's 152k vocabulary).

    Unchunked (torl.rl.grpo.token_logprobs on the full logits): the logits in the compute dtype, their fp32 copy, the
    fp32 log-softmax and the entropy's fp32 product, all kept for backward. Chunked (learner.logprob_chunk_tokens,
    torl/rl/logprobs.py): one chunk's logits in the compute dtype and at most two fp32 [chunk, vocab] tensors.
    """
    if chunk > 0:
        return min(chunk, tokens) * shape.vocab * (nbytes + 8)
    return tokens * shape.vocab * (nbytes + 12)


@dataclass(frozen=True)
class LearnerMemory:
    """One learner rank's memory, bytes. ``states`` live on the host under cpu_offload (and on CPU learners)."""

    states: float  # fp32 weights (the master copy) + fp32 grads + AdamW's two fp32 moments, sharded; + reference model
    gathered: float  # FSDP's unsharded working set
    activations: float
    head: float
    load: float  # the full fp32 model each rank holds before fully_shard

    @property
    def compute(self) -> float:
        return self.gathered + self.activations + self.head


def learner_memory(cfg: Config, shape: ModelShape) -> LearnerMemory:
    """Per rank, as actors/learner.py builds it: the model loaded in fp32 in host memory, then sharded with
    FSDP2 over ``learner.num_workers`` ranks when there are several, or offload or a 16-bit ``param_dtype``.

    Sharded states: 16 bytes/param / ranks (fp32 weights 4, grads 4, exp_avg 4, exp_avg_sq 4); the reference model
    (algo.kl_coef > 0) adds 4. FSDP's working set: the root unit (embedding, lm_head) and two decoder layers (the
    current one and the prefetched next) unsharded, each as the gathered compute-dtype weights, their compute-dtype
    gradients and the fp32 copy reduce-scattered: 2 * dtype + 4 bytes per param.
    """
    lc = cfg.learner
    nbytes = dtype_bytes(lc.param_dtype, "learner.param_dtype")
    per_param = 16 + (4 if cfg.algo.kl_coef > 0 else 0)
    sharded = lc.num_workers > 1 or lc.cpu_offload or lc.param_dtype != "float32"
    gathered = (shape.root_params + 2 * shape.layer_params) * (2 * nbytes + 4) if sharded else 0.0
    tokens = micro_batch_tokens(cfg)
    return LearnerMemory(
        states=per_param * shape.params / lc.num_workers,
        gathered=gathered,
        activations=activation_bytes(shape, tokens, nbytes, lc.gradient_checkpointing),
        head=head_bytes(shape, tokens, getattr(lc, "logprob_chunk_tokens", 0), nbytes),
        # Loaded in host memory; sharding moves one unit at a time to the GPU and keeps its shard (fp32).
        load=4 * (shape.params / lc.num_workers + max(shape.root_params, shape.layer_params))
        if sharded
        else 4 * shape.params,
    )


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


def weight_file_bytes(cfg: Config, shape: ModelShape) -> float:
    """One generator's weight file (file route): every weight in the engine dtype, a tied lm_head written out too."""
    params = shape.params + (shape.vocab * shape.hidden if shape.tied else 0)
    return params * dtype_bytes(cfg.model.dtype, "model.dtype")


def checkpoint_bytes(shape: ModelShape) -> float:
    """One checkpoint as actors/learner.py ``save`` writes it: model.safetensors in fp32 (tied weights once) and
    optimizer.pt with AdamW's two fp32 moments: 12 bytes/param (tokenizer, scheduler, RNG files are small)."""
    return 12 * shape.params


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
