"""GRPO math invariants: advantages, aggregation under any split, masking, clipping, KL estimators."""

import math
from types import SimpleNamespace

import pytest
import torch

from torl.rl.grpo import (
    aggregation_weights,
    group_advantages,
    kl_penalty,
    policy_loss,
    token_logprobs,
    zero_variance_groups,
)

MODES = ["token-mean", "seq-mean-token-sum-norm", "seq-mean-token-mean"]


def test_group_advantages_unbiased_std():
    adv = group_advantages([1.0, -1.0, -1.0, -1.0], [0, 0, 0, 0])
    mean, std = -0.5, math.sqrt(3 / 3)  # unbiased: sum of squares 3 over n-1 = 3
    assert adv == pytest.approx([(1 - mean) / (std + 1e-6)] + [(-1 - mean) / (std + 1e-6)] * 3)


def test_equal_reward_groups_give_zero_advantage():
    rewards, groups = [1, 1, 1, -1, -1, 1, 0.5, 0.5], [0, 0, 0, 1, 1, 1, 2, 2]
    adv = group_advantages(rewards, groups)
    assert adv[:3] == [0.0, 0.0, 0.0] and adv[6:] == [0.0, 0.0]
    assert all(a != 0 for a in adv[3:6])
    assert zero_variance_groups(rewards, groups) == {0, 2}


def test_dr_grpo_no_std_and_singleton_group():
    assert group_advantages([1, -1, -1, -1], [7, 7, 7, 7], norm_by_std=False) == [1.5, -0.5, -0.5, -0.5]
    assert group_advantages([0.3], [0]) == pytest.approx([0.3])  # veRL: mean 0, std 1 for a group of one
    with pytest.raises(ValueError):
        group_advantages([1, 2], [0])


def _batch(seed: int = 0, n_seqs: int = 8):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 9, (n_seqs,), generator=g)]
    seqs = []
    for i, n in enumerate(lens):
        mask = (torch.rand(n, generator=g) > 0.3).float()  # [n]
        mask[0] = 1.0
        seqs.append(
            {
                "logp": torch.randn(n, generator=g) * 0.3 - 2.0,  # [n]
                "old": torch.randn(n, generator=g) * 0.3 - 2.0,  # [n]
                "adv": torch.full((n,), float(torch.randn(1, generator=g))),  # [n]
                "mask": mask,
                "ent": torch.rand(n, generator=g),  # [n]
                "ref": torch.randn(n, generator=g) * 0.3 - 2.0,  # [n]
                "idx": i,
            }
        )
    return seqs


def _loss_and_grads(chunks, mode, total_tokens, total_seqs, **kw):
    """Sum of per-chunk losses (each normalised by global counts) and gradients wrt every sequence's logprobs."""
    leaves = {}
    total = 0.0
    for chunk in chunks:
        logp = [s["logp"].clone().requires_grad_(True) for s in chunk]
        for s, leaf in zip(chunk, logp, strict=True):
            leaves[s["idx"]] = leaf
        cat = lambda k, chunk=chunk: torch.cat([s[k] for s in chunk])  # noqa: E731
        seq_index = torch.cat([torch.full((len(s["mask"]),), j) for j, s in enumerate(chunk)])
        mask = cat("mask")
        w = aggregation_weights(mask, seq_index, mode, total_tokens, total_seqs, norm_const=10.0)
        ent = torch.cat(logp) * 0.1 + cat("ent")  # entropy that depends on the parameters too
        loss, _ = policy_loss(
            torch.cat(logp), cat("old"), cat("adv"), mask, w, entropy=ent, ref_logprobs=cat("ref"), **kw
        )
        loss.backward()
        total += float(loss.detach())
    return total, {i: leaf.grad for i, leaf in leaves.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_chunks", [2, 8])
def test_split_batch_equals_full_batch(mode, n_chunks):
    seqs = _batch()
    tokens = int(sum(s["mask"].sum() for s in seqs))
    kw = dict(clip_low=0.2, clip_high=0.28, entropy_coef=0.01, kl_coef=0.1)
    full_loss, full_grads = _loss_and_grads([seqs], mode, tokens, len(seqs), **kw)
    size = len(seqs) // n_chunks
    chunks = [seqs[i : i + size] for i in range(0, len(seqs), size)]
    split_loss, split_grads = _loss_and_grads(chunks, mode, tokens, len(seqs), **kw)
    assert split_loss == pytest.approx(full_loss, rel=1e-6, abs=1e-7)
    for i in full_grads:
        torch.testing.assert_close(split_grads[i], full_grads[i], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_masked_tokens_get_zero_gradient(mode):
    torch.manual_seed(0)
    logits = torch.randn(12, 50, requires_grad=True)  # [N, V]
    targets = torch.randint(0, 50, (12,))
    mask = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1], dtype=torch.float32)
    seq_index = torch.tensor([0] * 6 + [1] * 6)
    logp, ent = token_logprobs(logits, targets)
    w = aggregation_weights(mask, seq_index, mode, int(mask.sum()), 2, norm_const=8.0)
    loss, metrics = policy_loss(
        logp, logp.detach() - 0.1, torch.ones(12), mask, w, entropy=ent, entropy_coef=0.5,
        ref_logprobs=logp.detach() + 0.2, kl_coef=0.3,
    )  # fmt: skip
    loss.backward()
    assert logits.grad[mask == 0].abs().max() == 0
    assert logits.grad[mask == 1].abs().sum(-1).min() > 0
    assert metrics["tokens"] == 7


def test_zero_advantage_gives_zero_policy_gradient():
    logp = torch.randn(5, requires_grad=True)
    mask = torch.ones(5)
    w = aggregation_weights(mask, torch.zeros(5, dtype=torch.long), "token-mean", 5, 1)
    loss, _ = policy_loss(logp, logp.detach(), torch.zeros(5), mask, w)
    loss.backward()
    assert loss.item() == 0 and logp.grad.abs().max() == 0


def test_asymmetric_clip():
    old = torch.zeros(4)
    # ratios 0.7, 0.9, 1.25, 1.4 with positive advantage: only ratios above 1 + clip_high are clipped.
    logp = torch.log(torch.tensor([0.7, 0.9, 1.25, 1.4])).requires_grad_(True)
    mask = torch.ones(4)
    w = aggregation_weights(mask, torch.zeros(4, dtype=torch.long), "token-mean", 4, 1)
    loss, m = policy_loss(logp, old, torch.ones(4), mask, w, clip_low=0.2, clip_high=0.28)
    loss.backward()
    assert m["clip_frac"] == 1  # only the 1.4 token
    assert logp.grad[3] == 0 and (logp.grad[:3] != 0).all()
    # negative advantage: ratios below 1 - clip_low are clipped
    logp.grad = None
    loss, m = policy_loss(logp, old, -torch.ones(4), mask, w, clip_low=0.2, clip_high=0.28)
    loss.backward()
    assert m["clip_frac"] == 1 and logp.grad[0] == 0 and (logp.grad[1:] != 0).all()


def test_on_policy_loss_is_minus_mean_advantage():
    logp = torch.randn(6)
    mask = torch.tensor([1, 1, 1, 0, 1, 1.0])
    adv = torch.tensor([2.0, 2, 2, 2, -1, -1])
    w = aggregation_weights(mask, torch.tensor([0, 0, 0, 0, 1, 1]), "token-mean", 5, 2)
    loss, m = policy_loss(logp, logp, adv, mask, w)
    assert loss.item() == pytest.approx(-(2 * 3 - 2) / 5)
    assert m["ratio"] == pytest.approx(5) and m["approx_kl"] == 0 and m["clip_frac"] == 0


def test_aggregation_weight_sums():
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1.0])
    seq = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    assert aggregation_weights(mask, seq, "token-mean", 6, 3).sum().item() == pytest.approx(1.0)
    w = aggregation_weights(mask, seq, "seq-mean-token-mean", 6, 3)
    for s in range(3):
        assert w[seq == s].sum().item() == pytest.approx(1 / 3)
    w = aggregation_weights(mask, seq, "seq-mean-token-sum-norm", 6, 3, norm_const=4.0)
    assert w.sum().item() == pytest.approx(6 / (4 * 3))
    with pytest.raises(ValueError):
        aggregation_weights(mask, seq, "sum", 6, 3)


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_weights_stay_on_the_inputs_device(mode):
    """On a GPU the inputs are CUDA tensors and a factory without ``device`` makes a CPU one (#28: ``per_seq`` in
    seq-mean-token-mean). Here the default device is 'meta' and the inputs are on CPU: the same mismatch, on CPU."""
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1.0])
    seq = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    expected = aggregation_weights(mask, seq, mode, 6, 3, norm_const=4.0)
    with torch.device("meta"):
        w = aggregation_weights(mask, seq, mode, 6, 3, norm_const=4.0)
    assert w.device == mask.device
    torch.testing.assert_close(w, expected)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, 0.0])
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.0])
    assert kl_penalty(logp, ref, "low_var_kl").tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, 0.0])
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k9")


def test_token_logprobs_fp32_and_entropy():
    logits = torch.zeros(3, 8, dtype=torch.bfloat16)
    logp, ent = token_logprobs(logits, torch.tensor([0, 3, 7]))
    assert logp.dtype == torch.float32
    assert logp.tolist() == pytest.approx([-math.log(8)] * 3)
    assert ent.tolist() == pytest.approx([math.log(8)] * 3)


def _one(proximal, behaviour, mask, mode, level="token", cap=2.0, low=0.5, high=2.0) -> SimpleNamespace:
    """``rollout_correction`` of one sequence given as lists: its weights, surviving mask and stats as plain values."""
    from torl.rl.grpo import CORRECTION_STATS, rollout_correction

    weights, kept, stats = rollout_correction(
        torch.tensor(proximal, dtype=torch.float64),
        torch.tensor(behaviour, dtype=torch.float64),
        torch.tensor(mask, dtype=torch.long),
        torch.zeros(len(mask), dtype=torch.long),
        1,
        mode,
        level,
        cap,
        low,
        high,
    )
    return SimpleNamespace(
        weights=weights.tolist(), mask=kept.tolist(), stats=dict(zip(CORRECTION_STATS, stats[0].tolist(), strict=True))
    )


# Rollout correction against hand-computed values: proximal - behaviour log-ratios ln(3), 0, ln(0.25), and an
# observation token (mask 0) whose log-probs must be ignored.
_PROX = [math.log(3.0), -1.0, math.log(0.25), -5.0]
_BEHAV = [0.0, -1.0, 0.0, 0.0]
_MASK = [1, 1, 1, 0]


def test_tis_truncates_weights_at_the_cap():
    c = _one(_PROX, _BEHAV, _MASK, "tis", cap=2.0)
    assert c.weights == pytest.approx([2.0, 1.0, 0.25, 1.0])
    assert c.mask == _MASK
    assert c.stats["corrected"] == 1 and c.stats["tokens"] == 3
    assert c.stats["weight"] == pytest.approx(3.0 + 1.0 + 0.25)
    assert c.stats["max_abs_log_ratio"] == pytest.approx(math.log(4.0))
    # r = log(prox / behav) = ln 3, 0, ln 0.25: k3 = exp(r) - 1 - r = (2 - ln 3) + 0 + (ln 4 - 0.75) = 1.538 (the
    # inverted exp(-r) - 1 + r gives 2.046), k1 = -r = ln 4 - ln 3.
    assert c.stats["k3"] == pytest.approx(2.0 - math.log(3.0) + math.log(4.0) - 0.75)
    assert c.stats["k1"] == pytest.approx(math.log(4.0) - math.log(3.0))


def test_mismatch_k3_and_k1_average_to_kl_of_behaviour_to_proximal_over_behaviour_samples():
    """Both estimators, averaged over the tokens the engine would sample (each outcome weighted by its behaviour
    probability), give exactly KL(behaviour || proximal); the inverted k3, exp(-r) - 1 + r, does not."""
    from torl.rl.grpo import correction_metrics

    behav, prox = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    kl = sum(b * math.log(b / p) for b, p in zip(behav, prox, strict=True))
    pairs = zip(behav, prox, strict=True)
    stats = [_one([math.log(p)], [math.log(b)], [1], "none").stats for b, p in pairs]
    assert sum(b * s["k3"] for b, s in zip(behav, stats, strict=True)) == pytest.approx(kl)
    assert sum(b * s["k1"] for b, s in zip(behav, stats, strict=True)) == pytest.approx(kl)
    m = correction_metrics(stats)
    assert m["learner/mismatch_k3"] == pytest.approx(sum(s["k3"] for s in stats) / 3)
    assert m["learner/mismatch_k1"] == pytest.approx(sum(s["k1"] for s in stats) / 3)


def test_mis_keeps_the_importance_weight_inside_the_band_and_mis_reject_does_not():
    """Ratios 1.5 and 0.8 inside [0.5, 2], 3 and 0.25 outside: both modes drop the outside tokens; mis weights the
    kept ones by their ratio (IcePop), mis_reject by 1."""
    prox = [math.log(1.5), math.log(0.8), math.log(3.0), math.log(0.25), -5.0]
    behav, mask = [0.0] * 5, [1, 1, 1, 1, 0]
    mis = _one(prox, behav, mask, "mis", low=0.5, high=2.0)
    assert mis.mask == [1, 1, 0, 0, 0] and mis.stats["corrected"] == 2
    assert mis.weights[:2] == pytest.approx([1.5, 0.8])
    reject = _one(prox, behav, mask, "mis_reject", low=0.5, high=2.0)
    assert reject.mask == mis.mask and reject.weights == [1.0] * 5 and reject.stats["corrected"] == 2
    seq = _one(prox[:2], behav[:2], mask[:2], "mis", level="sequence", low=0.5, high=2.0)
    assert seq.mask == [1, 1] and seq.weights == pytest.approx([1.2, 1.2])  # 1.5 x 0.8, inside the band


def test_mis_reject_masks_tokens_outside_the_band_and_they_leave_the_denominator():
    import torch

    from torl.rl.grpo import aggregation_weights

    c = _one(_PROX, _BEHAV, _MASK, "mis_reject", low=0.5, high=2.0)
    assert c.mask == [0, 1, 0, 0] and c.weights == [1.0, 1.0, 1.0, 1.0] and c.stats["corrected"] == 2
    w = aggregation_weights(torch.tensor(c.mask), torch.zeros(4, dtype=torch.long), "token-mean", sum(c.mask), 1)
    assert w.tolist() == [0.0, 1.0, 0.0, 0.0]  # the one kept token carries the whole token mean


def test_sequence_level_weight_is_the_product_and_none_is_identity():
    seq = _one(_PROX, _BEHAV, _MASK, "tis", level="sequence", cap=10.0)
    assert seq.weights[:3] == pytest.approx([0.75, 0.75, 0.75]) and seq.weights[3] == 1.0
    none = _one(_PROX, _BEHAV, _MASK, "none")
    assert none.weights == [1.0] * 4 and none.mask == _MASK
    with pytest.raises(ValueError, match="lengths differ"):
        _one(_PROX, _BEHAV[:2], _MASK, "tis")


# Token ratios 1.5, 1.5, 1.2 on the model's tokens around a tool-output token whose (meaningless) log-ratio is +5:
# product 2.7, geometric mean 2.7 ** (1/3) = 1.3925 (2.7 ** (1/4) = 1.2818 if the tool token were counted).
_SEQ_PROX = [math.log(1.5) - 1.0, math.log(1.5) - 2.0, 5.0, math.log(1.2) - 0.5]
_SEQ_BEHAV = [-1.0, -2.0, 0.0, -0.5]
_SEQ_MASK = [1, 1, 0, 1]
_GEO = 2.7 ** (1 / 3)


@pytest.mark.parametrize(
    ("mode", "level", "thresholds", "weights", "mask", "corrected"),
    [
        ("tis", "token", (2.0, 0.5, 2.0), [1.5, 1.5, 1.0, 1.2], [1, 1, 0, 1], 0),
        ("tis", "sequence", (2.0, 0.5, 2.0), [2.0, 2.0, 1.0, 2.0], [1, 1, 0, 1], 3),  # 2.7 truncated at 2
        ("tis", "sequence", (3.0, 0.5, 3.0), [2.7, 2.7, 1.0, 2.7], [1, 1, 0, 1], 0),
        ("mis", "sequence", (2.0, 0.5, 2.0), [1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0], 3),  # 2.7 out of band: all dropped
        ("mis", "sequence", (3.0, 0.5, 3.0), [2.7, 2.7, 1.0, 2.7], [1, 1, 0, 1], 0),
        ("tis", "geometric", (1.3, 0.9, 1.3), [1.3, 1.3, 1.0, 1.3], [1, 1, 0, 1], 3),  # 1.3925 truncated at 1.3
        ("tis", "geometric", (1.5, 0.9, 1.5), [_GEO, _GEO, 1.0, _GEO], [1, 1, 0, 1], 0),
        ("mis", "geometric", (1.5, 0.7, 1.5), [_GEO, _GEO, 1.0, _GEO], [1, 1, 0, 1], 0),  # in band, weight kept
        ("mis", "geometric", (1.3, 0.7, 1.3), [1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0], 3),  # 1.3925 > 1.3: dropped
        ("mis_reject", "geometric", (1.5, 0.7, 1.5), [1.0, 1.0, 1.0, 1.0], [1, 1, 0, 1], 0),
        ("mis_reject", "geometric", (1.3, 0.7, 1.3), [1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0], 3),
    ],
)
def test_sequence_and_geometric_levels_truncate_and_mask_whole_sequences(
    mode, level, thresholds, weights, mask, corrected
):
    """One weight per sequence: the product of the model tokens' ratios (sequence) or their geometric mean
    (geometric, veRL's Geo-RS), truncated at the cap or dropping every model token of the sequence outside the band
    (#30). Worked out by hand; the tool token neither enters the weight nor is counted in the mean."""
    cap, low, high = thresholds
    c = _one(_SEQ_PROX, _SEQ_BEHAV, _SEQ_MASK, mode, level=level, cap=cap, low=low, high=high)
    assert c.weights == pytest.approx(weights) and c.mask == mask and c.stats["corrected"] == corrected
    assert c.stats["weight"] == pytest.approx(3 * {"sequence": 2.7, "geometric": _GEO}.get(level, 4.2 / 3))


def test_geometric_level_keeps_long_sequences_that_the_product_rejects():
    """3000 model tokens each 0.03% more likely under the proximal policy: the product is e^0.9 = 2.46, outside the
    product's band [0.5, 2]; the geometric mean is 1.0003, inside its own band [0.999, 1.001] (veRL's Geo-RS), and
    AlgoConfig hands each level its thresholds."""
    from torl.config_load import load_config

    prox, behav, mask = [-1.0 + 3e-4] * 3000, [-1.0] * 3000, [1] * 3000
    seq_cfg = load_config([], ["algo.correction_level=sequence", "algo.rollout_correction=mis"]).algo
    geo_cfg = load_config([], ["algo.correction_level=geometric", "algo.rollout_correction=mis"]).algo
    assert seq_cfg.correction_thresholds() == (2.0, 0.5, 2.0)
    assert geo_cfg.correction_thresholds() == (1.001, 0.999, 1.001)
    seq = _one(prox, behav, mask, "mis", "sequence", *seq_cfg.correction_thresholds())
    geo = _one(prox, behav, mask, "mis", "geometric", *geo_cfg.correction_thresholds())
    assert sum(seq.mask) == 0 and seq.stats["weight"] / 3000 == pytest.approx(math.exp(0.9))
    assert geo.mask == mask and geo.weights[0] == pytest.approx(math.exp(3e-4))


def test_policy_loss_scales_each_token_by_its_importance_weight():
    import torch

    from torl.rl.grpo import policy_loss

    logp = torch.tensor([-1.0, -2.0])
    adv, mask, w = torch.tensor([1.0, -1.0]), torch.ones(2), torch.tensor([0.5, 0.5])
    plain, _ = policy_loss(logp, logp, adv, mask, w)
    weighted, _ = policy_loss(logp, logp, adv, mask, w, is_weights=torch.tensor([2.0, 0.25]))
    # ratio 1: per-token loss -A; weighted by (0.5 * 2.0, 0.5 * 0.25)
    assert float(plain) == pytest.approx(-0.5 + 0.5) and float(weighted) == pytest.approx(-1.0 + 0.125)


@pytest.mark.parametrize("mode", ["none", "tis", "mis", "mis_reject"])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_batched_correction_equals_each_sequence_alone(mode, level):
    """The learner corrects a whole packed batch in one tensor pass (#28: a Python pass per token cost ~2.8 s per
    step at 2048 x 2000 tokens); each sequence's weights, mask and stats must be those it gets alone, with lengths
    that differ (one sequence empty, one all tool output) and ratios on both sides of every threshold."""
    from torl.rl.grpo import CORRECTION_STATS, rollout_correction

    gen = torch.Generator().manual_seed(2)
    lengths = [7, 0, 12, 5, 30]
    seqs = []
    for j, n in enumerate(lengths):
        behav = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
        prox = behav + torch.randn(n, generator=gen, dtype=torch.float64) * (0.4 if level == "sequence" else 0.6)
        mask = (torch.rand(n, generator=gen) > 0.2).long() if j != 3 else torch.zeros(n, dtype=torch.long)
        seqs.append((prox, behav, mask))
    cap, low, high = (1.001, 0.999, 1.001) if level == "geometric" else (1.5, 0.7, 1.4)
    flat = [torch.cat([s[k] for s in seqs]) for k in range(3)]
    seq_index = torch.cat([torch.full((n,), j) for j, n in enumerate(lengths)])
    weights, kept, stats = rollout_correction(*flat, seq_index, len(seqs), mode, level, cap, low, high)
    start = 0
    for j, (prox, behav, mask) in enumerate(seqs):
        alone = _one(prox.tolist(), behav.tolist(), mask.tolist(), mode, level, cap, low, high)
        end = start + lengths[j]
        assert weights[start:end].tolist() == pytest.approx(alone.weights, rel=1e-12)
        assert kept[start:end].tolist() == alone.mask
        assert dict(zip(CORRECTION_STATS, stats[j].tolist(), strict=True)) == pytest.approx(alone.stats, rel=1e-12)
        start = end
    assert stats[1].tolist() == [0.0] * len(CORRECTION_STATS)  # the empty sequence
    if mode != "none":
        assert stats[:, 3].sum() > 0, "no ratio crossed a threshold: the inputs do not exercise the correction"
