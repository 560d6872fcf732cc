"""What a model of a given shape takes in bytes: parameters, a learner rank's states and working set, activations,
the log-prob head, KV cache per token, weight files and checkpoints.

The preflight (``torl/infra/preflight.py``) sets these against the hardware; ``bench/gpu_smoke.py`` sets the learner's
against a measured peak. Sizes are bytes (GiB = 2^30 bytes where one is named). These are estimates that aim a little
high; each formula's docstring says what it counts and where its constants come from.

Not here: what the machine has (``torl/infra/hardware.py``), need against have (``torl/infra/preflight.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torl.config import Config, ConfigError

GiB = 2**30
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


def dtype_bytes(name: str, key: str) -> int:
    if name not in DTYPE_BYTES:
        raise ConfigError(f"{key}: unknown dtype {name!r}; one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


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


# ---------------------------------------------------------------------------------------------------------------
# Weight files and checkpoints


def weight_file_bytes(cfg: Config, shape: ModelShape) -> float:
    """One generator's weight file (file route): every weight in the engine dtype, a tied lm_head written out too."""
    params = shape.params + (shape.vocab * shape.hidden if shape.tied else 0)
    return params * dtype_bytes(cfg.model.dtype, "model.dtype")


def checkpoint_bytes(shape: ModelShape) -> float:
    """One checkpoint as actors/learner.py ``save`` writes it: model.safetensors in fp32 (tied weights once) and
    optimizer.pt with AdamW's two fp32 moments: 12 bytes/param (tokenizer, scheduler, RNG files are small)."""
    return 12 * shape.params
