"""The learner rank: GRPO updates of a Hugging Face causal LM sharded with FSDP2 over a torch.distributed group.

``Learner`` is one rank (a plain class, usable in-process); ``LearnerActor = ray.remote(Learner)``. The ranks form a
process group (gloo on CPU, NCCL on GPU) and shard the model per decoder layer + root with ``fully_shard`` (FSDP1
crashes on CPU, docs/platform-notes.md §3). With one worker the model is not wrapped (plain PyTorch), but a one-rank
process group still exists so the state-dict and checkpoint code is the same. Every rank receives the whole batch and
computes the same deterministic plan (``torl.rl.batching``), then trains on its shard; losses are normalised by global
counts (``torl.rl.grpo``) so any sharding gives the full-batch gradient.

Not here: placing the ranks and calling them together (``actors/learner_group.py``), the GRPO formulas
(``torl/rl/grpo.py``), the checkpoint layout (``torl/infra/checkpoint.py``), weight loading in the generators
(``actors/generator.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import os
import shutil
import socket
import time
import types
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import AutoConfig, AutoModelForCausalLM

from torl.config import Config, learner_threads
from torl.infra import checkpoint as ckpt
from torl.infra.devices import attention_implementation, process_group_backend, require_cuda
from torl.infra.storage import Storage, StorageError, run_storage
from torl.rl.batching import pack_responses, plan_micro_batches
from torl.rl.dynamic_sampling import group_signal
from torl.rl.grpo import (
    CORRECTION_STATS,
    aggregation_weights,
    correction_metrics,
    group_advantages,
    policy_loss,
    rollout_correction,
    zero_variance_groups,
)
from torl.rl.logprobs import causal_lm_logprobs
from torl.rollout.types import Trajectory

log = logging.getLogger(__name__)

# Files copied next to the weights so a checkpoint is a complete HF model directory (copied, not re-saved: a
# re-save through AutoTokenizer can change the pre-tokenizer, docs/platform-notes.md §4).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_METRIC_KEYS = ("loss", "pg_loss", "tokens", "seqs", "clip_frac", "approx_kl", "ratio", "entropy", "kl_ref")


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _flat(rows: list[list[Any]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Concatenate per-sequence lists into one flat tensor (the packed token order)."""
    return torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=dtype, device=device)


def _split(flat: list[Any], trajs: list[Trajectory]) -> list[list[Any]]:
    """``flat`` (the packed token order) cut back into one list per trajectory's response."""
    out, start = [], 0
    for t in trajs:
        out.append(flat[start : start + len(t.response_ids)])
        start += len(t.response_ids)
    return out


def _has_dropout(model: torch.nn.Module) -> bool:
    """Whether a train() forward draws dropout (a ``Dropout`` module or an attention's ``attention_dropout``, which
    HF applies only in train() mode): its log-probs are then not the eval() proximal pass's."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
        if float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False


def _bind_logprobs(model: torch.nn.Module) -> None:
    """Give ``model`` a ``torl_logprobs(ids, pos, keep, chunk_tokens, temperature)`` method (``causal_lm_logprobs``:
    decoder, then the chunked head, so the micro-batch's full logits never exist) and, when sharded, register it as an
    FSDP forward method. It calls ``model.model`` and reads ``model.lm_head.weight`` directly, so without the root's
    pre-forward hook the root's own parameters (embeddings, final norm, head) would still be shards, and without the
    hooks it installs on the outputs their gradients would not be reduce-scattered. No-op registration unsharded."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    model.torl_logprobs = types.MethodType(causal_lm_logprobs, model)
    register_fsdp_forward_method(model, "torl_logprobs")


class Learner:
    """One learner rank. Call ``setup`` (on every rank, concurrently) before anything else."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1) -> None:
        if not Path(model_path, "config.json").is_file():
            raise FileNotFoundError(f"learner: no Hugging Face model at {model_path!r} (config.json missing)")
        self.cfg, self.model_path, self.rank, self.world_size = cfg, model_path, rank, world_size
        self._ahead: list[ray.ObjectRef] = []  # rollouts decoding beside the current train_step (see _threads)
        torch.set_num_threads(learner_threads(cfg, os.cpu_count() or 1, engine_busy=cfg.trainer.max_staleness > 0))
        lc = cfg.learner
        require_cuda("learner.num_gpus", lc.num_gpus, torch.cuda.is_available(), torch.__version__, torch.version.cuda)
        use_cuda = lc.num_gpus > 0
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        self.backend = process_group_backend(lc.backend, use_cuda)
        flash = importlib.util.find_spec("flash_attn") is not None
        self.attn_implementation = attention_implementation(lc.attn_implementation, use_cuda, flash)
        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        self.optimizer_steps = 0
        self._fleet: Any = None  # the generators, seen from learner rank 0 (collective weight route)
        self._weight_sender: Any = None  # this rank's end of the weight-transfer group

    # ---- setup -------------------------------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the process-group rendezvous."""
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        # Probed on every address: torch's TCPStore listens on all of them, so a port free on ``host`` alone can be
        # taken on another (a connection's local port on another loopback address of a machine hosting two nodes).
        with socket.socket() as s:
            s.bind(("", 0))
            return host, s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            self.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank, world_size=self.world_size
        )
        self.model = self._build_model(trainable=True)
        # The reference model costs a full copy: build it only when its KL term counts (ToRL: kl_coef 0).
        self.ref_model = self._build_model(trainable=False) if self.cfg.algo.kl_coef > 0 else None
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, foreach=False
        )
        warmup = o.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        log.info("learner rank %d/%d ready (%s, %s)", self.rank, self.world_size, self.backend, self.device)

    def _build_model(self, trainable: bool) -> torch.nn.Module:
        lc = self.cfg.learner
        # Master weights stay fp32; param_dtype is the compute dtype under FSDP mixed precision. Loaded in host
        # memory: sharding moves one layer at a time to the device and keeps this rank's shard, so a GPU never holds
        # the whole fp32 model (7B: 30 GB) on the way.
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=torch.float32, attn_implementation=self.attn_implementation
        )
        model.config.use_cache = False
        if trainable and lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train(trainable)
        model.requires_grad_(trainable)
        if self.world_size > 1 or lc.cpu_offload or lc.param_dtype != "float32":
            self._shard(model)
        else:
            model.to(self.device)
        _bind_logprobs(model)
        return model

    def _shard(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        lc = self.cfg.learner
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        kwargs: dict[str, Any] = {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(param_dtype=_dtype(lc.param_dtype), reduce_dtype=torch.float32),
            "offload_policy": CPUOffloadPolicy() if lc.cpu_offload else OffloadPolicy(),
        }
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(f"{type(model).__name__}: expected decoder layers at model.model.layers to shard")
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)

    # ---- training ----------------------------------------------------------------------------------------
    def train_step(self, trajs: list[Trajectory], ahead: list[ray.ObjectRef] | None = None) -> dict[str, float]:
        """Advantages, optional zero-variance filtering, then epochs x mini-batches optimizer steps on ``trajs``.

        ``ahead``: the rollouts of later steps decoding meanwhile (pipelining); this rank keeps to its CPU share
        until they have finished, then takes every core (``torl.config.learner_threads``)."""
        t0 = time.perf_counter()
        if not trajs:
            raise ValueError("train_step got an empty batch")
        for t in trajs:
            t.check()
        self._ahead = list(ahead or [])
        self._threads()
        algo, lc = self.cfg.algo, self.cfg.learner
        rewards, groups = [t.reward for t in trajs], [t.group for t in trajs]
        order = list(dict.fromkeys(groups))  # prompts in batch order
        per = lc.mini_batch_prompts or max(len(order), 1)
        minis = [set(order[k : k + per]) for k in range(0, len(order), per)]
        reuse = self._reuses_training_forward(len(minis))
        t_prox = time.perf_counter()
        stats: list[dict[str, float]] = []
        is_w: list[list[float]] | None = None
        if not reuse:
            # The PPO ratio's old policy: the weights held now, before this step's updates (AReaL's proximal
            # policy), or the engine's sampling log-probs. The engine's stay the behaviour policy of the correction.
            recompute = algo.old_logprobs == "recompute"
            proximal = self._proximal_logprobs(trajs) if recompute else [t.logprobs for t in trajs]
            seq_index = _flat([[j] * len(t.response_ids) for j, t in enumerate(trajs)], torch.long, self.device)
            prox_flat = _flat(proximal, torch.float64, self.device)  # [N]
            weights, kept = self._correct_against_engine(trajs, prox_flat, seq_index, stats)  # [N], [N]
            is_w, masks = _split(weights.tolist(), trajs), _split(kept.long().tolist(), trajs)
            trajs = [
                dataclasses.replace(t, logprobs=list(prox), loss_mask=mask)
                for t, prox, mask in zip(trajs, proximal, masks, strict=True)
            ]
        t_prox = time.perf_counter() - t_prox
        adv = group_advantages(rewards, groups, algo.norm_adv_by_std, algo.adv_eps)
        # By dynamic sampling's own criterion (correctness by default), which keeps such groups out (jobs/loop.py).
        zero = zero_variance_groups(group_signal(trajs, algo.dynamic_sampling_metric), groups)
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        for _ in range(lc.epochs):
            for mini in minis:
                idx = [i for i, g in enumerate(groups) if g in mini]
                batch_w = None if is_w is None else [is_w[i] for i in idx]
                out = self._optimizer_step([trajs[i] for i in idx], [adv[i] for i in idx], batch_w, stats)
                if out is not None:
                    steps += 1
                    for k, v in out.items():
                        sums[k] += v
        if reuse and self.world_size > 1:  # each rank corrected its own micro-batches: the metrics cover them all
            shares: list[list[dict[str, float]] | None] = [None] * self.world_size
            dist.all_gather_object(shares, stats)
            stats = [s for share in shares for s in share or []]
        n_groups = len(set(groups))
        metrics = {f"learner/{k}": v / max(steps, 1) for k, v in sums.items()}
        metrics.update(
            {
                "learner/optimizer_steps": float(steps),
                "learner/zero_var_group_share": len(zero) / n_groups,
                "learner/trained_seqs": float(len(trajs)),
                "learner/adv_abs_mean": sum(abs(a) for a in adv) / len(adv),
                "learner/lr": self.scheduler.get_last_lr()[0],
                # The learner's own compute; the driver's time/train adds the Ray round trip around it.
                "learner/time_train": time.perf_counter() - t0,
                "learner/time_old_logprobs": t_prox,
                "learner/old_logprobs_reused": float(reuse),
                **correction_metrics(stats),
            }
        )
        return metrics

    def _reuses_training_forward(self, n_minis: int) -> bool:
        """Whether the old log-probs can be the training forward's own, detached, instead of a proximal pass.

        The proximal policy is the weights held before this step's updates. When the batch makes one optimizer step
        (one epoch, one mini-batch), the training forward runs on exactly those weights, packed in the same
        micro-batches, so a separate pass would recompute the same numbers: the correction against the engine then
        takes its proximal side from that forward. This holds at any staleness: how old the engine's weights were
        is the correction's business, not the proximal policy's. Not taken when a second update would see moved
        weights (epochs or mini-batches > 1), with engine old log-probs (nothing to recompute), or with dropout (a
        train() forward is not the eval() policy)."""
        algo, lc = self.cfg.algo, self.cfg.learner
        return algo.old_logprobs == "recompute" and lc.epochs == 1 and n_minis == 1 and not _has_dropout(self.model)

    def _threads(self) -> None:
        """Intra-op threads for what runs beside this rank now: its CPU share while a rollout ahead decodes on the
        same cores, every core once none does (the engine then idles until the next push). Checked between
        micro-batches; a check is one non-blocking ``ray.wait``."""
        if self._ahead:
            ready, _ = ray.wait(self._ahead, num_returns=len(self._ahead), timeout=0, fetch_local=False)
            if len(ready) == len(self._ahead):
                self._ahead = []
        n = learner_threads(self.cfg, os.cpu_count() or 1, engine_busy=bool(self._ahead))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)

    def _optimizer_step(
        self,
        batch: list[Trajectory],
        adv: list[float],
        is_w: list[list[float]] | None,
        stats: list[dict[str, float]] | None = None,
    ) -> dict[str, float] | None:
        """One optimizer step on ``batch``, whose ``logprobs`` are the PPO ratio's old policy and ``is_w`` the rollout
        correction's weights; ``is_w`` None: ``logprobs`` are the engine's and each micro-batch takes the old policy
        from its own training forward and corrects against the engine there, appending the correction's per-sequence
        sums to ``stats`` (``_reuses_training_forward``)."""
        algo, lc = self.cfg.algo, self.cfg.learner
        total_tokens = sum(sum(t.loss_mask) for t in batch)
        total_seqs = sum(1 for t in batch if any(t.loss_mask))
        if total_tokens == 0:  # identical on every rank, so all ranks skip together
            return None
        # mis/mis_reject on the training forward's own log-probs: the tokens they reject, and so the step's loss
        # denominators, are known only after the last micro-batch's forward. The loss is linear in 1 / total_tokens
        # (token-mean) or 1 / total_seqs (the seq- modes), so it is taken with unit denominators and the gradient is
        # scaled by the true ones after the last backward.
        deferred = is_w is None and algo.rollout_correction in ("mis", "mis_reject")
        if deferred:
            total_tokens = total_seqs = 1
        norm_const = algo.max_response_tokens_norm or self.cfg.rollout.max_response_tokens
        lengths = [len(t.prompt_ids) + len(t.response_ids) for t in batch]
        plan = plan_micro_batches(lengths, self.world_size, lc.micro_batch_tokens)[self.rank]
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        for mb in plan:
            self._threads()
            sub = [batch[i] for i in mb]
            sub_w = None if is_w is None else [is_w[i] for i in mb]
            loss, m = self._micro_step(sub, [adv[i] for i in mb], sub_w, total_tokens, total_seqs, norm_const, stats)
            # FSDP averages gradients over ranks; scaling by world size turns that into the sum of shard gradients.
            (loss * self.world_size).backward()
            for k, v in m.items():
                sums[k] += v
        vec = torch.tensor([sums[k] for k in _METRIC_KEYS], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(vec)
        red = dict(zip(_METRIC_KEYS, vec.tolist(), strict=True))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if deferred:
            if red["tokens"] == 0:  # every token rejected: no step, as when the mask was corrected beforehand
                self.optimizer.zero_grad(set_to_none=True)
                return None
            scale = 1.0 / (red["tokens"] if algo.loss_agg == "token-mean" else red["seqs"])
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            red["loss"], red["pg_loss"] = red["loss"] * scale, red["pg_loss"] * scale
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer_steps += 1
        tok = max(red["tokens"], 1.0)
        out = {"loss": red["loss"], "pg_loss": red["pg_loss"], "grad_norm": float(grad_norm), "tokens": red["tokens"]}
        out.update({k: red[k] / tok for k in ("clip_frac", "approx_kl", "ratio", "entropy")})
        if self.ref_model is not None:
            out["kl_ref"] = red["kl_ref"] / tok
        return out

    def _forward_logprobs(
        self, model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies [N], [N] of the tokens after ``keep`` in the packed row ``ids`` (chunked head), of
        the policy at ``rollout.temperature``: the current, proximal and reference log-probs alike, as the engine's
        processed log-probs are (veRL divides the logits by T in every one of these forwards)."""
        lc = self.cfg.learner
        return model.torl_logprobs(ids, pos, keep, lc.logprob_chunk_tokens, self.cfg.rollout.temperature)

    def _join_collectives(self) -> torch.Tensor:
        """A one-token pass of a rank whose micro-batch is empty: FSDP's collectives run on every rank, so it takes
        the same forward as the others. Returns a zero loss attached to the graph (its backward joins too)."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        pos = torch.arange(2, device=self.device)[None]
        logp, _ = self._forward_logprobs(self.model, ids, pos, torch.zeros(1, dtype=torch.long, device=self.device))
        return logp.sum() * 0.0

    def _micro_step(
        self,
        sub: list[Trajectory],
        adv: list[float],
        is_w: list[list[float]] | None,
        total_tokens: int,
        total_seqs: int,
        norm_const: float,
        stats: list[dict[str, float]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch's loss; ``is_w`` None: old policy and correction from this forward (``_optimizer_step``)."""
        algo = self.cfg.algo
        if not sub:
            return self._join_collectives(), {}
        ids, pos, keep = pack_responses([(t.prompt_ids, t.response_ids) for t in sub])  # [1, L], [1, L], [N]
        ids, pos, keep = ids.to(self.device), pos.to(self.device), keep.to(self.device)
        dev = self.device
        advs = _flat([[a] * len(t.response_ids) for t, a in zip(sub, adv, strict=True)], torch.float32, dev)  # [N]
        seq_index = _flat([[j] * len(t.response_ids) for j, t in enumerate(sub)], torch.long, dev)  # [N]
        logp, entropy = self._forward_logprobs(self.model, ids, pos, keep)  # [N], [N]
        if is_w is None:  # the proximal policy is this forward's (see _reuses_training_forward)
            old = logp.detach()  # [N]
            weights_is, mask = self._correct_against_engine(sub, old, seq_index, stats)  # [N], [N]
            weights_is, mask = weights_is.float(), mask.float()
        else:
            old = _flat([t.logprobs for t in sub], torch.float32, dev)  # [N], the proximal policy (see train_step)
            mask = _flat([t.loss_mask for t in sub], torch.float32, dev)  # [N]
            weights_is = _flat(is_w, torch.float32, dev)  # [N]
        weights = aggregation_weights(mask, seq_index, algo.loss_agg, total_tokens, total_seqs, norm_const)  # [N]
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = self._forward_logprobs(self.ref_model, ids, pos, keep)  # [N]
        loss, m = policy_loss(
            logp,
            old,
            advs,
            mask,
            weights,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            entropy=entropy,
            entropy_coef=algo.entropy_coef,
            ref_logprobs=ref,
            kl_coef=algo.kl_coef,
            kl_type=algo.kl_type,
            is_weights=weights_is,
        )
        m["loss"] = float(loss.detach())
        m["seqs"] = float((torch.zeros(len(sub), device=dev).index_add_(0, seq_index, mask) > 0).sum())
        return loss, m

    def _correct_against_engine(
        self,
        sub: list[Trajectory],
        proximal: torch.Tensor,
        seq_index: torch.Tensor,
        stats: list[dict[str, float]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rollout_correction`` of the sequences of ``sub`` (packed order) against their engine log-probs, in one
        tensor pass on the learner's device: the importance weights [N] and the loss mask [N] less what mis rejects,
        from the proximal log-probs ``proximal`` [N] (``seq_index`` [N]: each token's sequence); the per-sequence sums
        go to ``stats``."""
        algo = self.cfg.algo
        cap, low, high = algo.correction_thresholds()
        dev = proximal.device
        behaviour = _flat([t.logprobs for t in sub], torch.float64, dev)  # [N], as sampled (no float32 rounding)
        mask = _flat([t.loss_mask for t in sub], torch.float32, dev)  # [N]
        weights, kept, per_seq = rollout_correction(
            proximal,
            behaviour,
            mask,
            seq_index,
            len(sub),
            algo.rollout_correction,
            algo.correction_level,
            cap,
            low,
            high,
        )
        if stats is not None:
            stats.extend(dict(zip(CORRECTION_STATS, row, strict=True)) for row in per_seq.tolist())
        return weights, kept

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The policy as a distribution, not as a training forward: dropout (and any train-only behaviour) off, as
        veRL's compute_log_prob runs in eval(); back in train() mode after, for the updates."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    @torch.no_grad()
    def _proximal_logprobs(self, trajs: list[Trajectory]) -> list[list[float]]:
        """Each trajectory's response log-probs under the weights held now, in eval() mode (``_evaluating``),
        micro-batched like training; under FSDP every rank computes its share and the shares are exchanged, so all
        ranks see every sequence."""
        lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
        plan = plan_micro_batches(lengths, self.world_size, self.cfg.learner.micro_batch_tokens)[self.rank]
        local: dict[int, list[float]] = {}
        with self._evaluating():
            for mb in plan:
                self._threads()
                if not mb:  # the other ranks still run a forward pass: join the collectives
                    self._join_collectives()
                    continue
                seqs = [(trajs[i].prompt_ids, trajs[i].response_ids) for i in mb]
                local.update(zip(mb, self._sequence_logprobs(seqs), strict=True))
        if self.world_size > 1:
            shares: list[dict[int, list[float]] | None] = [None] * self.world_size
            dist.all_gather_object(shares, local)
            local = {i: lp for share in shares for i, lp in (share or {}).items()}
        return [local[i] for i in range(len(trajs))]

    def _sequence_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        ids, pos, keep = (x.to(self.device) for x in pack_responses(sequences))  # [1, L], [1, L], [N]
        logp, _ = self._forward_logprobs(self.model, ids, pos, keep)
        out, start = [], 0
        for _, r in sequences:
            out.append(logp[start : start + len(r)].tolist())
            start += len(r)
        return out

    @torch.no_grad()
    def logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Per-token log-probs of each (prompt_ids, response_ids) under the current policy (fp32, at
        ``rollout.temperature``, as the engine reports them).

        A collective under FSDP: call it on every rank with the same input. In eval() mode, as the proximal pass."""
        with self._evaluating():
            return self._sequence_logprobs(sequences)

    # ---- weights and checkpoints -------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded CPU state dict on rank 0 (tied ``lm_head.weight`` included), None elsewhere. Collective."""
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype) for k, v in sd.items()}
        if self.tied and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd

    def connect_generators(self, generators: list[Any], master: tuple[str, int]) -> None:
        """Join the weight-transfer group with every generator's engine workers (call on every rank at once).

        Rank 0 hosts the group at ``master`` and sends; the other ranks only take part in the FSDP gathers of each
        push (``actors/weight_sync.py``).
        """
        from actors.weight_sync import GeneratorFleet, LearnerWeights, connect, engine_workers

        if self._weight_sender is not None:  # re-forming the group after a generator was replaced
            self._weight_sender.shutdown()
        rc = self.cfg.rollout
        self._fleet = GeneratorFleet(generators, engine_workers(self.cfg), rc.weight_sync_timeout_s)
        source = LearnerWeights(self.model, _dtype(self.cfg.model.dtype), self.tied, self.device)
        self._weight_sender = connect(self.cfg, self._fleet, source, self.rank, master)

    def push_weights(self, version: int) -> dict[str, float]:
        """Broadcast the current weights to every engine, which tags later tokens ``version``. Collective."""
        t0 = time.perf_counter()
        self._fleet.version = version
        self._weight_sender.send_weights()
        return {"time/weight_sync": time.perf_counter() - t0}

    def rng_state(self) -> dict[str, Any]:
        return ckpt.get_rng_state()

    def _storage(self) -> Storage | None:
        return run_storage(self.cfg.trainer.storage_path, self.cfg.trainer.output_dir)

    def save(self, path: str, extra: dict[str, Any], rng_states: list[dict[str, Any]]) -> str | None:
        """Write a complete checkpoint to ``path`` atomically (rank 0 writes; every rank joins the gathers), upload it
        to ``trainer.storage_path`` if set, and keep the last ``trainer.keep_last`` beside it on this node.

        Returns None, or (rank 0) why the upload failed: the checkpoint is then complete on this node only."""
        model_sd = self.full_state_dict()
        optim_sd = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.rank != 0:
            return
        assert model_sd is not None
        if self.tied:  # HF convention: tied weights are stored once (safetensors also refuses shared tensors)
            model_sd = {k: v for k, v in model_sd.items() if k != "lm_head.weight"}
        src = Path(self.cfg.model.tokenizer_path or self.model_path)

        def write(tmp: Path) -> None:
            self.hf_config.save_pretrained(tmp)
            save_file(
                {k: v.contiguous() for k, v in model_sd.items()}, tmp / ckpt.MODEL_FILE, metadata={"format": "pt"}
            )
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            torch.save(optim_sd, tmp / ckpt.OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), tmp / ckpt.SCHEDULER_FILE)
            torch.save(rng_states, tmp / ckpt.RNG_FILE)
            ckpt.write_trainer_state(tmp, extra)

        ckpt.write_atomic(path, write)
        log.info("saved checkpoint %s", path)
        failed = None
        if (storage := self._storage()) is not None:
            try:
                storage.upload_checkpoint(path)
            except StorageError as exc:
                failed = f"checkpoint {path} was saved on this node but not stored: {exc}"
        # With a storage this node's copies are a cache (the storage is pruned by the driver); without one they are
        # the checkpoints, pruned here, where they were written (the driver may run on another node).
        ckpt.prune_checkpoints(Path(path).parent, self.cfg.trainer.keep_last)
        return failed

    def load(self, path: str, stored: bool = False) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and this rank's RNG state from ``path``; returns the extra state.

        ``stored``: ``path`` is this node's copy of the checkpoint of that name in ``trainer.storage_path``,
        downloaded first when this node lacks it (once per node, whichever rank asks first)."""
        if stored and (storage := self._storage()) is not None:
            storage.download_checkpoint(Path(path).name, Path(path).parent)
        if not ckpt.is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {ckpt.MARKER} marker)")
        sd = load_file(str(Path(path) / ckpt.MODEL_FILE))
        if self.tied and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True))
        optim_sd = torch.load(Path(path) / ckpt.OPTIMIZER_FILE, weights_only=False)
        set_optimizer_state_dict(self.model, self.optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(torch.load(Path(path) / ckpt.SCHEDULER_FILE, weights_only=False))
        rng = torch.load(Path(path) / ckpt.RNG_FILE, weights_only=False)
        ckpt.set_rng_state(rng[self.rank % len(rng)])
        return ckpt.read_trainer_state(path)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


LearnerActor = ray.remote(Learner)
