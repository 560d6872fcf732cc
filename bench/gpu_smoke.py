"""One GRPO learner step of a Qwen2.5-Math-1.5B-shaped model on one GPU, built as the learner builds it, with checks.

    .venv/bin/python bench/gpu_smoke.py            # GPU: the 1.5B shape, one 16384-token micro-batch; checks below
    .venv/bin/python bench/gpu_smoke.py --tiny     # CPU: a tiny shape, 256 tokens, seconds (no memory or MFU check)

Torch and transformers only (no Ray, no vLLM, no network), so it runs on a bare GPU machine in minutes: a randomly
initialised Qwen2 of Qwen2.5-Math-1.5B's shape with gradient checkpointing (configs/torl_1.5b.yaml), one packed row of
(prompt, response) sequences of ToRL-like lengths (``torl.rl.batching.pack_responses``, position ids restarting per
sequence). The model is the learner's (``Learner._build_model``): fp32 master weights and AdamW states, FSDP2 (one
rank, the learner's process-group backend) with bf16 compute (``MixedPrecisionPolicy``), the learner's attention
(``torl.infra.devices.attention_implementation``: flex attention or varlen flash attention on GPU, sdpa on CPU) and the
log-prob method registered as an FSDP forward. Each step is the learner's micro-step with the project's functions:
the decoder and the chunked head (``torl.rl.logprobs.causal_lm_logprobs`` at ``learner.logprob_chunk_tokens``),
``torl.rl.grpo.aggregation_weights`` and ``policy_loss``, backward, grad clip, AdamW. The old log-probs come from a
no-grad pass first, as with ``algo.old_logprobs=recompute``.

Figures: tokens/s of the last step (the first pays for CUDA warm-up and flex attention's compile); peak memory
(``torch.cuda.max_memory_allocated`` over the whole run; on CPU the process's peak RSS); MFU = model FLOPs / step
time / the card's bf16 dense peak, with model FLOPs = 6 x (params - head) x tokens + 6 x head x response tokens (the
head only runs where a log-prob is needed) + 6 x layers x hidden x sum(sequence length^2) (causal attention within
each sequence, forward and backward). Gradient checkpointing's recompute is not counted, as usual for MFU.

It fails (exit status 1, naming the check) unless: every parameter and AdamW state is fp32 and the layers compute in
bf16; on GPU, the peak memory is within the preflight's estimate for this micro-batch (``torl.infra.model_sizes
.learner_memory``: states + FSDP working set + activations + head) plus ``--memory-margin`` (10 %); and on GPU the
MFU is at least ``--mfu-floor``: 15 %, a floor well under what a 1.5B step on 16k-token rows reaches on an H100 with
flex attention (about a third of the work of the dense path's attention), so a regression to dense attention,
fp32 compute or an unsharded model shows.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import resource
import socket
import time
import types
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen2Config

from torl.config import Config
from torl.infra.devices import attention_implementation, process_group_backend
from torl.infra.model_sizes import ModelShape, learner_memory
from torl.rl.batching import pack_responses
from torl.rl.grpo import aggregation_weights, group_advantages, policy_loss
from torl.rl.logprobs import causal_lm_logprobs

# bf16 dense tensor-core peaks (vendor datasheets, no sparsity); the first name contained in the device name wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def model_config(tiny: bool) -> Qwen2Config:
    """Qwen2.5-Math-1.5B's shape (its config.json, with a 4096 context and rope_theta 10000), or a tiny one."""
    if tiny:
        shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
        shape |= {"intermediate_size": 128, "vocab_size": 512}
    else:
        shape = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2}
        shape |= {"intermediate_size": 8960, "vocab_size": 151936}
    return Qwen2Config(
        **shape, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096, use_cache=False
    )


@dataclass
class Batch:
    """One packed micro-batch and the flat [N] loss inputs over its response tokens."""

    ids: torch.Tensor  # [1, L]
    pos: torch.Tensor  # [1, L]
    keep: torch.Tensor  # [N]
    lengths: list[int]  # prompt + response length of each sequence
    adv: torch.Tensor  # [N]
    mask: torch.Tensor  # [N]
    weights: torch.Tensor  # [N]


def make_batch(tokens: int, vocab: int, device: torch.device, seed: int = 0) -> Batch:
    """(prompt, response) pairs filling ``tokens`` (lengths up to ToRL's limits, 400 and 3072, scaled down for a
    row shorter than the default micro-batch), groups of 4 with 0/1 rewards, tokens 20-39 of each response masked
    (a tool output)."""
    cfg, rng = Config(), random.Random(seed)
    scale = min(1.0, tokens / cfg.learner.micro_batch_tokens)
    limits = (cfg.prompt.max_prompt_tokens, cfg.rollout.max_response_tokens)
    max_prompt, max_resp = (max(1, int(n * scale)) for n in limits)
    pairs, left = [], tokens
    while left > 1:
        p = min(rng.randint(max(1, max_prompt // 4), max_prompt), left // 2)
        r = min(rng.randint(max(1, max_resp // 4), max_resp), left - p)
        pairs.append(([rng.randrange(vocab) for _ in range(p)], [rng.randrange(vocab) for _ in range(r)]))
        left -= p + r
    ids, pos, keep = pack_responses(pairs)
    groups = [i // 4 for i in range(len(pairs))]
    adv_seq = group_advantages([float(rng.random() < 0.5) for _ in pairs], groups)
    adv = torch.cat([torch.full((len(r),), a) for (_, r), a in zip(pairs, adv_seq, strict=True)])  # [N]
    mask = torch.cat([(torch.arange(len(r)) // 20 != 1).float() for _, r in pairs])  # [N]
    seq_index = torch.cat([torch.full((len(r),), j) for j, (_, r) in enumerate(pairs)])  # [N]
    algo = cfg.algo
    norm = algo.max_response_tokens_norm or max_resp
    weights = aggregation_weights(mask, seq_index, algo.loss_agg, int(mask.sum()), len(pairs), norm)  # [N]
    lengths = [len(p) + len(r) for p, r in pairs]
    ids, pos, keep, adv, mask, weights = (t.to(device) for t in (ids, pos, keep, adv, mask, weights))
    return Batch(ids, pos, keep, lengths, adv, mask, weights)


def build_learner_model(cfg: Qwen2Config, device: torch.device, compute: torch.dtype) -> torch.nn.Module:
    """The learner's model (``Learner._build_model`` and ``_shard``, ``_bind_logprobs``): fp32 master weights
    sharded by FSDP2 over a one-rank group, ``compute`` as the mixed-precision param dtype, fp32 gradient reduction,
    the learner's attention, and ``torl_logprobs`` registered as an FSDP forward method."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    cuda = device.type == "cuda"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = process_group_backend("auto", cuda)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    attn = attention_implementation("auto", cuda, importlib.util.find_spec("flash_attn") is not None)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mesh = init_device_mesh(device.type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.torl_logprobs = types.MethodType(causal_lm_logprobs, model)
    register_fsdp_forward_method(model, "torl_logprobs")
    return model


def learner_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, old: torch.Tensor, chunk: int
) -> float:
    """Forward, loss, backward, grad clip and AdamW step, as ``Learner._micro_step`` and ``_optimizer_step``."""
    cfg = Config()
    algo = cfg.algo
    logp, entropy = model.torl_logprobs(batch.ids, batch.pos, batch.keep, chunk)  # [N], [N]
    loss, _ = policy_loss(
        logp,
        old,
        batch.adv,
        batch.mask,
        batch.weights,
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        entropy=entropy,
        entropy_coef=algo.entropy_coef,
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def model_flops(model: torch.nn.Module, cfg: Qwen2Config, batch: Batch) -> float:
    """Forward + backward model FLOPs of one step (see the module docstring)."""
    params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    head = cfg.vocab_size * cfg.hidden_size
    dense = 6 * (params - head) * batch.ids.shape[1] + 6 * head * batch.keep.numel()
    attention = 6 * cfg.num_hidden_layers * cfg.hidden_size * sum(n * n for n in batch.lengths)
    return float(dense + attention)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"bf16 dense, {name}"
    return None, f"{name} not in the table; pass --peak-tflops"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (peak RSS of the process)"


def check_precision(model: torch.nn.Module, opt: torch.optim.Optimizer, seen: set[torch.dtype]) -> list[str]:
    """What the learner keeps in fp32 (weights, AdamW moments) and computes in bf16 (``seen``: the dtypes the first
    layer's projection produced): prints them, returns the failures (none when both hold)."""
    masters = {p.dtype for p in model.parameters()}
    moments = {v.dtype for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.ndim}
    names = [", ".join(sorted(str(d).removeprefix("torch.") for d in x)) for x in (masters, moments, seen)]
    print(f"precision: weights {names[0]}, AdamW states {names[1]}, layers computed in {names[2]}")
    failures = []
    if masters != {torch.float32} or moments != {torch.float32}:
        failures.append(f"master weights {names[0]} and AdamW states {names[1]}, not float32")
    if seen != {torch.bfloat16}:
        failures.append(f"the layers computed in {names[2]}, not bfloat16")
    return failures


def memory_estimate(cfg: Qwen2Config, tokens: int, chunk: int) -> float:
    """The preflight's per-rank GPU bytes for this step (one rank: states + FSDP working set + activations + head)."""
    base = Config()
    lc = replace(
        base.learner,
        num_workers=1,
        param_dtype="bfloat16",
        gradient_checkpointing=True,
        micro_batch_tokens=tokens,
        logprob_chunk_tokens=chunk,
    )
    mem = learner_memory(replace(base, learner=lc), ModelShape.from_hf_config(cfg.to_dict()))
    return mem.states + mem.compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and 256 tokens in fp32 (the CPU check)")
    ap.add_argument("--tokens", type=int, help="micro-batch tokens (default 16384, --tiny 256)")
    ap.add_argument("--chunk", type=int, help="log-prob chunk (default learner.logprob_chunk_tokens, --tiny 64)")
    ap.add_argument("--steps", type=int, default=2, help="learner steps; tokens/s is the last one's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak, overriding the table")
    ap.add_argument("--mfu-floor", type=float, help="fail below this MFU in %% (default 15 on GPU, none on CPU)")
    ap.add_argument(
        "--memory-margin", type=float, default=0.10, help="GPU peak allowed above the preflight's estimate"
    )
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tokens = args.tokens or (256 if args.tiny else Config().learner.micro_batch_tokens)
    chunk = args.chunk if args.chunk is not None else (64 if args.tiny else Config().learner.logprob_chunk_tokens)
    torch.manual_seed(0)
    cfg = model_config(args.tiny)
    model = build_learner_model(cfg, device, torch.bfloat16)
    seen: set[torch.dtype] = set()
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    o = Config().optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, foreach=False)
    batch = make_batch(tokens, cfg.vocab_size, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"device: {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}".rstrip())
    print(
        f"model: Qwen2, {params / 1e6:.1f}M params, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, FSDP2 fp32 master / bf16 compute, {model.config._attn_implementation} attention, "
        "gradient checkpointing"
    )
    print(
        f"batch: {batch.ids.shape[1]} tokens in one packed row, {len(batch.lengths)} sequences, "
        f"{batch.keep.numel()} response tokens, log-prob chunk {chunk}"
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        old, _ = model.torl_logprobs(batch.ids, batch.pos, batch.keep, chunk)  # [N], the proximal policy
    _sync(device)
    print(f"old log-probs (no grad): {time.perf_counter() - t0:.2f} s")
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        loss = learner_step(model, opt, batch, old, chunk)
        _sync(device)
        seconds = time.perf_counter() - t0
        print(f"step {step}: loss {loss:.6f}, {seconds:.2f} s")
    failures = check_precision(model, opt, seen)
    print(f"tokens/s: {batch.ids.shape[1] / seconds:.0f}")
    print(f"peak memory: {_peak_memory(device)}")
    if device.type == "cuda":
        estimate = memory_estimate(cfg, tokens, chunk)
        peak_bytes = torch.cuda.max_memory_allocated(device)
        print(f"preflight estimate: {estimate / 2**30:.2f} GiB (+{100 * args.memory_margin:.0f}% allowed)")
        if peak_bytes > estimate * (1 + args.memory_margin):
            failures.append(f"peak memory {peak_bytes / 2**30:.2f} GiB above the preflight's {estimate / 2**30:.2f}")
    peak, source = peak_tflops(device, args.peak_tflops)
    achieved = model_flops(model, cfg, batch) / seconds / 1e12
    mfu = 100 * achieved / peak if peak else None
    shown = f"{mfu:.1f}% of {peak:g} TFLOPS" if mfu is not None else "n/a"
    print(f"MFU: {shown} ({achieved:.3g} TFLOPS achieved; {source})")
    floor = args.mfu_floor if args.mfu_floor is not None else (15.0 if device.type == "cuda" else None)
    if floor is not None and (mfu is None or mfu < floor):
        failures.append(f"MFU {'unknown' if mfu is None else f'{mfu:.1f}%'} below the floor of {floor:g}%")
    if not math.isfinite(loss):
        failures.append(f"non-finite loss {loss}")
    dist.destroy_process_group()
    if failures:
        raise SystemExit("gpu_smoke FAILED: " + "; ".join(failures))
    print("gpu_smoke: all checks passed")


if __name__ == "__main__":
    main()
