"""GRPO math as pure functions: group advantages, per-token log-probs, the clipped policy loss and its aggregation.

Tensors are flat over the response tokens of the sequences in one micro-batch (``[N]``, packed without padding),
so the same code serves any packing. Loss aggregation is expressed as per-token weights normalised by GLOBAL counts
(all micro-batches of all ranks of one optimizer step): summing the micro-batch losses, or the shard gradients,
gives exactly the full-batch loss and gradient.

Not here: models, optimizers, distribution (``actors/learner.py``), how sequences are split (``torl/rl/batching.py``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch

LossAgg = Literal["token-mean", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
KLType = Literal["low_var_kl", "k1", "k2"]
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum-norm", "seq-mean-token-mean")
KL_TYPES: tuple[str, ...] = ("low_var_kl", "k1", "k2")


def _groups(rewards: Sequence[float], group_ids: Sequence[int]) -> dict[int, list[float]]:
    if len(rewards) != len(group_ids):
        raise ValueError(f"{len(rewards)} rewards but {len(group_ids)} group ids")
    by_group: dict[int, list[float]] = defaultdict(list)
    for r, g in zip(rewards, group_ids, strict=True):
        by_group[g].append(float(r))
    return by_group


def group_advantages(
    rewards: Sequence[float], group_ids: Sequence[int], norm_by_std: bool = True, eps: float = 1e-6
) -> list[float]:
    """Outcome advantage of each sample relative to the other samples of its prompt (GRPO).

    ``(r - mean) / (std + eps)`` with the unbiased std, as ToRL/veRL ``compute_grpo_outcome_advantage``;
    ``norm_by_std=False`` gives Dr.GRPO's ``r - mean``. A group of one sample keeps its raw reward (veRL sets mean 0,
    std 1 there). The value is broadcast over the response tokens by the caller.

    >>> group_advantages([1, -1, 1, 1], [0, 0, 1, 1])
    [0.7071..., -0.7071..., 0.0, 0.0]
    """
    by_group = _groups(rewards, group_ids)
    stats: dict[int, tuple[float, float]] = {}
    for g, rs in by_group.items():
        if len(rs) == 1:
            stats[g] = (0.0, 1.0)
            continue
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
        stats[g] = (mean, std)
    out = []
    for r, g in zip(rewards, group_ids, strict=True):
        mean, std = stats[g]
        out.append((float(r) - mean) / (std + eps) if norm_by_std else float(r) - mean)
    return out


def zero_variance_groups(rewards: Sequence[float], group_ids: Sequence[int]) -> set[int]:
    """Groups whose rewards are all equal (they give zero advantage; DAPO's dynamic sampling drops them)."""
    return {g for g, rs in _groups(rewards, group_ids).items() if max(rs) == min(rs)}


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and the entropy of each position's distribution, in fp32, of the policy that
    samples at ``temperature``: softmax(logits / T).

    The engine samples from, and reports the log-probs of, that same distribution (vLLM's processed log-probs,
    ``actors/engine.py``), so on-policy the ratio to them is 1 up to kernel noise at any T (veRL divides the
    logits by T the same way). fp32 for the same reason.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature  # out of place: ``z`` may be ``logits`` itself, which autograd still needs
    logp_all = torch.log_softmax(z, dim=-1)  # [N, V]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N]
    return logp, entropy


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLType) -> torch.Tensor:
    """Per-token KL estimate of the policy to the reference (Schulman's k1/k2/k3; k3 = veRL's ``low_var_kl``)."""
    if kind == "k1":
        return logprobs - ref_logprobs  # [N]
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()  # [N]
    if kind == "low_var_kl":
        log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # [N]
        return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)  # [N], veRL clamps k3 to +-10
    raise ValueError(f"unknown kl_type {kind!r}; choose one of {KL_TYPES}")


def aggregation_weights(
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    mode: LossAgg,
    total_tokens: int,
    total_seqs: int,
    norm_const: float = 1.0,
) -> torch.Tensor:
    """Per-token weights w so that ``sum(w * loss_per_token)`` is the aggregated loss of the GLOBAL batch.

    ``mask`` [N] is 1 on trained tokens; ``seq_index`` [N] numbers the sequences of this micro-batch (a sequence is
    never split across micro-batches). ``total_tokens``/``total_seqs`` count trained tokens / sequences with at least
    one trained token over the whole optimizer step.
      - token-mean (ToRL): every trained token of the step weighs the same, 1 / total_tokens.
      - seq-mean-token-mean: mean over the sequence's tokens, then mean over sequences.
      - seq-mean-token-sum-norm (Dr.GRPO): token sum divided by a constant (the max response length), then mean over
        sequences, so long and short responses are not re-weighted by their length.
    """
    mask = mask.float()  # [N]
    if mode == "token-mean":
        return mask / max(total_tokens, 1)  # [N]
    if mode == "seq-mean-token-sum-norm":
        return mask / (norm_const * max(total_seqs, 1))  # [N]
    if mode == "seq-mean-token-mean":
        size = int(seq_index.max()) + 1 if seq_index.numel() else 0
        per_seq = torch.zeros(size, dtype=mask.dtype, device=mask.device)  # [S]
        per_seq.index_add_(0, seq_index, mask)
        return mask / (per_seq.clamp(min=1.0)[seq_index] * max(total_seqs, 1))  # [N]
    raise ValueError(f"unknown loss_agg {mode!r}; choose one of {LOSS_AGG_MODES}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: KLType = "low_var_kl",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate against ``old_logprobs`` (the proximal policy: the learner's own log-probs before the
    update, or the engine's with ``algo.old_logprobs=engine``), plus optional entropy bonus and KL to a reference.
    ``is_weights`` [N] correct each token for the engine's sampling policy (``rollout_correction``).

    All inputs are flat ``[N]`` over response tokens; ``weights`` come from ``aggregation_weights`` (zero on masked
    tokens: tool output gets no gradient, entropy or KL). Ratio clipping is asymmetric: ``[1 - clip_low,
    1 + clip_high]`` (DAPO's clip-higher when clip_high > clip_low). Returns the loss (a micro-batch's share of the
    global loss) and metric SUMS over trained tokens (``tokens`` is their count): the caller adds them over
    micro-batches and ranks and divides by the total, which keeps metrics exact under any split.
    """
    maskf = mask.float()  # [N]
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # [N]; clamp as veRL: a stale token must not overflow
    ratio = log_ratio.exp()  # [N]
    pg_unclipped = -advantages * ratio  # [N]
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [N]
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [N]
    if is_weights is not None:  # rollout correction: proximal / behaviour, truncated or 1 (``rollout_correction``)
        pg = pg * is_weights
    pg_loss = (pg * weights).sum()
    loss = pg_loss
    metrics = {
        "tokens": float(maskf.sum()),
        "pg_loss": float(pg_loss.detach()),
        "clip_frac": float(((pg_clipped > pg_unclipped).float() * maskf).sum()),
        # k1 of KL(old || current) against ``old_logprobs`` (the proximal policy, not the engine's unless
        # algo.old_logprobs=engine): how far the updates moved, as veRL's ppo_kl; the engine's is mismatch_k1/k3
        "approx_kl": float((-log_ratio.detach() * maskf).sum()),
        "ratio": float((ratio.detach() * maskf).sum()),
    }
    if entropy is not None:
        metrics["entropy"] = float((entropy.detach() * maskf).sum())
        if entropy_coef:
            loss = loss - entropy_coef * (entropy * weights).sum()
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_type)  # [N]
        metrics["kl_ref"] = float((kl.detach() * maskf).sum())
        if kl_coef:
            loss = loss + kl_coef * (kl * weights).sum()
    return loss, metrics


Correction = Literal["none", "tis", "mis", "mis_reject"]
CORRECTION_LEVELS: tuple[str, ...] = ("token", "sequence", "geometric")


CORRECTION_STATS: tuple[str, ...] = ("tokens", "k3", "k1", "corrected", "weight", "max_abs_log_ratio")


def rollout_correction(
    proximal: torch.Tensor,
    behaviour: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    mode: Correction,
    level: str = "token",
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Importance weights proximal/behaviour for a packed batch of sequences, as tensor ops on the inputs' device:
    the learner's policy before the update over the engine's sampling policy (vLLM's kernels and precision differ
    from the learner's; a stale batch differs more).

    ``proximal``, ``behaviour`` [N] log-probs, ``mask`` [N] (1 = trained), ``seq_index`` [N] (each token's sequence,
    0 .. ``num_seqs`` - 1). Returns ``weights`` [N] (the inputs' float dtype; 1.0 where nothing is corrected and on
    untrained tokens), the surviving mask [N] (``mask``'s dtype) and ``stats`` [S, 6] (``CORRECTION_STATS``). Ratios
    are formed in float64: a 3000-token sequence's summed log-ratio must not round. One call replaces a Python pass
    over every token of the batch on every learner rank (#28: ~2.8 s per step at 2048 x 2000 tokens).

    ``tis`` truncates the weight at ``cap`` (veRL's rollout-correction TIS). ``mis`` drops the tokens whose weight
    falls outside ``[low, high]`` from the loss and keeps the weight on the others (IcePop, as veRL, slime and AReaL
    do: inside the band the staleness and numerics are still corrected); ``mis_reject`` drops the same tokens but
    gives the kept ones weight 1 (rejection only). Dropped tokens leave the mask, so the caller's aggregation counts
    them out of the denominator too.

    ``level`` says what one weight covers: ``token``, each token its own ratio; ``sequence``, the whole sequence one
    weight, the product of its token ratios (exp of the summed log-ratios: the sequence's true likelihood ratio, whose
    spread grows with length); ``geometric``, one weight per sequence, the geometric mean of its token ratios (exp of
    the MEAN log-ratio over the sequence's trained tokens: veRL's geometric level / Geo-RS), which stays near 1 at any
    length and so wants thresholds of its own near 1 (the caller passes them; ``AlgoConfig.correction_thresholds``).
    Sequence and geometric weights truncate or drop all of a sequence's trained tokens together. Only trained tokens
    enter any of them: tool output has no behaviour log-prob.

    ``stats`` holds, per sequence, SUMS over trained tokens (``tokens``; ``k3`` and ``k1``: two estimates per token
    of KL(behaviour || proximal) from the behaviour's own samples, see below; ``corrected``: tokens truncated or
    masked; ``weight``: the raw weight) plus ``max_abs_log_ratio`` (a max), so callers can reduce over any split.

    With r = log(proximal / behaviour) on a token the engine sampled, ``k1 = -r`` and ``k3 = exp(r) - 1 - r`` both
    have expectation KL(behaviour || proximal) under the behaviour policy (veRL's ``compute_offpolicy_metrics``):
    k3 is never negative and has the lower variance, k1 is the direct mean log-ratio to check it against.
    """
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"unknown correction level {level!r}; choose one of {CORRECTION_LEVELS}")
    if not (proximal.shape == behaviour.shape == mask.shape == seq_index.shape):
        raise ValueError(
            f"lengths differ: {len(proximal)} proximal, {len(behaviour)} behaviour, {len(mask)} mask, "
            f"{len(seq_index)} sequence indices"
        )
    out_dtype = proximal.dtype
    trained = mask > 0  # [N]
    zero = torch.zeros((), dtype=torch.float64, device=proximal.device)
    log_ratio = torch.where(trained, (proximal.double() - behaviour.double()).clamp(-20.0, 20.0), zero)  # [N]

    def per_seq(x: torch.Tensor) -> torch.Tensor:  # [N] -> [S] sums
        return torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add_(0, seq_index, x)

    n_trained = per_seq(trained.double())  # [S]
    if level in ("sequence", "geometric"):
        total = per_seq(log_ratio)  # [S]
        seq = torch.exp((total if level == "sequence" else total / n_trained.clamp(min=1.0)).clamp(-20.0, 20.0))
        raw = torch.where(trained, seq[seq_index], 1.0)  # [N]
    else:
        raw = torch.where(trained, torch.exp(log_ratio), 1.0)  # [N]
    kept = mask
    if mode == "tis":
        corrected = trained & (raw > cap)  # [N]
        weights = torch.where(corrected, cap, raw)  # [N]
    elif mode in ("mis", "mis_reject"):
        in_band = (raw >= low) & (raw <= high)  # [N]
        corrected = trained & ~in_band  # out of band: dropped from the loss and its denominator
        weights = torch.where(trained & in_band, raw, 1.0) if mode == "mis" else torch.ones_like(raw)  # [N]
        kept = torch.where(corrected, torch.zeros_like(mask), mask)  # [N]
    elif mode == "none":
        corrected = torch.zeros_like(trained)
        weights = torch.ones_like(raw)
    else:
        raise ValueError(f"unknown rollout correction {mode!r}; choose one of none, tis, mis, mis_reject")
    k3 = torch.where(trained, torch.expm1(log_ratio) - log_ratio, zero)  # [N]
    max_abs = torch.zeros(num_seqs, dtype=torch.float64, device=proximal.device).scatter_reduce_(
        0, seq_index, log_ratio.abs(), "amax"
    )  # [S]; 0 on untrained tokens and for a sequence without any
    stats = torch.stack(
        [
            n_trained,
            per_seq(k3),
            per_seq(-log_ratio),
            per_seq(corrected.double()),
            per_seq(torch.where(trained, raw, zero)),
            max_abs,
        ],
        dim=1,
    )  # [S, 6]
    return weights.to(out_dtype), kept, stats


def correction_metrics(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Batch figures of the engine/learner mismatch from ``rollout_correction``'s per-sequence sums."""
    tokens = max(sum(s["tokens"] for s in stats), 1.0)
    return {
        "learner/mismatch_k3": sum(s["k3"] for s in stats) / tokens,
        "learner/mismatch_k1": sum(s["k1"] for s in stats) / tokens,
        "learner/mismatch_max_abs_log_ratio": max((s["max_abs_log_ratio"] for s in stats), default=0.0),
        "learner/is_corrected_share": sum(s["corrected"] for s in stats) / tokens,
        "learner/is_weight_mean": sum(s["weight"] for s in stats) / tokens,
    }
