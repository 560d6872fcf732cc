"""Learner group on a tiny Qwen2: FSDP2 parity with plain PyTorch, weight export, masking, micro-batching, resume."""

import copy
import dataclasses
import math
import random
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from actors.learner import Learner
from actors.learner_group import LearnerGroup
from torl.config import AlgoConfig, Config, LearnerConfig, OptimConfig, TrainerConfig, replace
from torl.infra import checkpoint as ckpt
from torl.infra.devices import DeviceError
from torl.rollout.types import Trajectory

LR = 1e-3  # large enough that optimizer state and every step visibly matter
CLIP = 0.5  # below the tiny model's gradient norm, so clipping is exercised


def _cfg(num_workers=2, micro_batch_tokens=40, **algo):
    # The parity tests check the PPO ratio against the old log-probs the batch carries: engine log-probs, no
    # correction. The learner's own old log-probs and the rollout correction have tests of their own below.
    # A log-prob chunk of 7 tokens splits every micro-batch unevenly: the reference computes the full logits.
    algo = {"old_logprobs": "engine", "rollout_correction": "none", **algo}
    lc = LearnerConfig(
        num_workers=num_workers, num_cpus=1, micro_batch_tokens=micro_batch_tokens, logprob_chunk_tokens=7
    )
    return Config(
        algo=AlgoConfig(**algo),
        optim=OptimConfig(lr=LR, grad_clip=CLIP),
        learner=lc,
        trainer=TrainerConfig(keep_last=1),
    )


def _hf(path_or_sd, model_dir):
    if isinstance(path_or_sd, dict):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        m.load_state_dict(path_or_sd)
        return m
    return AutoModelForCausalLM.from_pretrained(path_or_sd, dtype=torch.float32)


def _hf_logprobs(model, prompt, response, temperature=1.0):
    logits = model(torch.tensor([prompt + response])).logits[0]  # [L, V]
    logp = torch.log_softmax(logits.float() / temperature, -1)[len(prompt) - 1 : -1]  # [R, V]
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)  # [R]


def _batch(seed, model, n_groups=3, n=4):
    """Groups of n trajectories with a masked 'tool output' run in some responses; behaviour logprobs = the
    current model's logprobs plus noise, so ratios differ from 1 and some get clipped."""
    rng = random.Random(seed)
    trajs = []
    for g in range(n_groups):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(4, 12))]
        for _ in range(n):
            resp = [rng.randrange(3, 300) for _ in range(rng.randrange(2, 24))]
            mask = [1] * len(resp)
            if len(resp) > 8 and rng.random() < 0.6:
                a = rng.randrange(2, len(resp) - 4)
                mask[a : a + 4] = [0] * 4
            with torch.no_grad():
                lp = _hf_logprobs(model, prompt, resp)
            old = [float(x) + rng.gauss(0, 0.3) if m else 0.0 for x, m in zip(lp, mask, strict=True)]
            reward = 1.0 if rng.random() < 0.5 else -1.0
            trajs.append(Trajectory(f"p{g}", g, prompt, resp, old, mask, [0] * len(resp), reward=reward))
    return trajs


def _reference_advantages(trajs):
    """GRPO advantages written out in plain PyTorch: (r - group mean) / (unbiased group std + 1e-6)."""
    by_group = {}
    for t in trajs:
        by_group.setdefault(t.group, []).append(t.reward)
    stats = {g: (torch.tensor(r).mean(), torch.tensor(r).std()) for g, r in by_group.items()}  # unbiased std
    return [(t.reward - stats[t.group][0]) / (stats[t.group][1] + 1e-6) for t in trajs]


def _reference_step(model, trajs, clip=0.2):
    """Plain single-process PyTorch: GRPO advantages, clipped ratio, token-mean over the batch, grad clip, AdamW."""
    total = sum(sum(t.loss_mask) for t in trajs)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.01)
    loss = 0.0
    for t, adv in zip(trajs, _reference_advantages(trajs), strict=True):
        ratio = torch.exp(_hf_logprobs(model, t.prompt_ids, t.response_ids) - torch.tensor(t.logprobs))
        per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
        loss = loss + (per_tok * torch.tensor(t.loss_mask, dtype=torch.float32)).sum() / total
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return float(loss.detach()), float(grad_norm)


@pytest.fixture(scope="module")
def group(ray_cluster, tiny_model_dir):
    g = LearnerGroup(_cfg(), str(tiny_model_dir))
    yield g
    g.shutdown()


def test_fsdp_parity_with_plain_pytorch(group, tiny_model_dir):
    before = ray_get(group.state_dict_ref())
    assert "lm_head.weight" in before  # tied weights are exported under both names
    ref_model = _hf(before, tiny_model_dir)
    trajs = _batch(0, ref_model)
    metrics = group.train_step(trajs)
    loss, grad_norm = _reference_step(ref_model, trajs)
    assert metrics["learner/optimizer_steps"] == 1
    assert metrics["learner/clip_frac"] > 0
    assert metrics["learner/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert metrics["learner/grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert grad_norm > CLIP  # so clipping was exercised
    after = ray_get(group.state_dict_ref())
    # Adam's first step is about lr * sign(g): where g is ~0 the summation order (sharded vs one process) can move a
    # weight by a small fraction of lr, so compare updates at 1% of lr.
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(after[k], v, rtol=1e-5, atol=LR * 1e-2, msg=k)
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_learner_ranks_sleep_at_openmp_barriers(group):
    """Each rank's intra-op threads wait passively: with libgomp's default spinning, the CPU learning run took 205 s
    instead of 61 s beside a one-core busy loop (docs/platform-notes.md §16). libgomp reads the policy when it loads,
    so the rank's process must be started with it, not set it later."""
    ranks = [p for p in psutil.Process().children(recursive=True) if " ".join(p.cmdline()).startswith("ray::Learner")]
    assert len(ranks) >= 2, "the group's two ranks were not found among this session's processes"
    assert {p.environ().get("OMP_WAIT_POLICY") for p in ranks} == {"PASSIVE"}


def test_uneven_shards_run_empty_micro_batches(group, tiny_model_dir):
    """3 sequences over half the budget (40) on 2 ranks: one rank has 2 micro-batches, the other 1 + an empty one."""
    ref_model = _hf(ray_get(group.state_dict_ref()), tiny_model_dir)
    trajs = [t for t in _batch(11, ref_model, n_groups=6, n=4) if len(t.prompt_ids) + len(t.response_ids) > 20][:3]
    assert len(trajs) == 3
    for i, t in enumerate(trajs):  # one group with distinct rewards
        t.group, t.reward = 0, float(i)
    metrics = group.train_step(trajs)
    loss, grad_norm = _reference_step(ref_model, trajs)
    assert metrics["learner/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert metrics["learner/grad_norm"] == pytest.approx(grad_norm, rel=1e-5)


def test_pushed_weights_reproduce_learner_logprobs(group, tiny_model_dir, tmp_path):
    sd = ray_get(group.state_dict_ref())
    # What a generator does with the pushed dict: write safetensors (tied copy dropped) and reload with HF.
    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    for name in ("config.json",):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    hf = _hf(str(tmp_path), tiny_model_dir)
    seqs = [([5, 17, 42, 9], [33, 8, 100, 7, 250]), ([12, 13], [14, 15, 16])]
    learner_lp = group.logprobs(seqs)
    with torch.no_grad():
        for (p, r), lp in zip(seqs, learner_lp, strict=True):
            torch.testing.assert_close(torch.tensor(lp), _hf_logprobs(hf, p, r), rtol=0, atol=1e-5)


def test_resume_equals_uninterrupted(group, tiny_model_dir, tmp_path, ray_cluster):
    model = _hf(ray_get(group.state_dict_ref()), tiny_model_dir)
    b1, b2, b3 = (_batch(s, model) for s in (1, 2, 3))
    group.train_step(b1)
    group.train_step(b2)
    group.save(ckpt.step_dir(tmp_path, 1), {"step": 1, "data_pos": 99})  # keep_last=1: pruned by the next save
    path = Path(group.save(ckpt.step_dir(tmp_path, 2), {"step": 2, "data_pos": 123}))  # where it is (str or URI)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002"]
    m3 = group.train_step(b3)
    uninterrupted = ray_get(group.state_dict_ref())
    # The checkpoint is a plain HF model directory.
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert (path / "tokenizer.json").is_file()
    resumed = LearnerGroup(_cfg(), str(tiny_model_dir))
    try:
        assert resumed.load(path) == {"step": 2, "data_pos": 123}
        loaded = ray_get(resumed.state_dict_ref())
        for k, v in hf.state_dict().items():
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
        r3 = resumed.train_step(b3)
        after = ray_get(resumed.state_dict_ref())
    finally:
        resumed.shutdown()
    assert r3["learner/loss"] == pytest.approx(m3["learner/loss"], rel=1e-6)
    for k, v in uninterrupted.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6, msg=k)


def ray_get(ref):
    import ray

    return ray.get(ref)


def test_gpus_the_learner_cannot_use_fail_at_start_naming_the_cause(tiny_model_dir, monkeypatch):
    """learner.num_gpus > 0 where torch finds no CUDA (a CPU-only torch on a GPU node, a driver too old for the
    build) is refused before any work (#28); the learner used to train on CPU over gloo without a word."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg(num_workers=1)
    with pytest.raises(DeviceError, match=r"learner.num_gpus=1 but torch \S+ "):
        Learner(replace(cfg, learner=replace(cfg.learner, num_gpus=1)), str(tiny_model_dir))


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    """One in-process learner rank (no Ray) for cheap invariance checks; weights reset per use via load_state."""
    learner = Learner(_cfg(num_workers=1, micro_batch_tokens=10_000), str(tiny_model_dir))
    learner.setup(*learner.master_address())
    yield learner
    learner.shutdown()


def _loss_and_norm(learner, trajs, budget, state):
    learner.model.load_state_dict(state)
    learner.cfg = replace(learner.cfg, learner=LearnerConfig(num_workers=1, micro_batch_tokens=budget))
    m = learner._optimizer_step(trajs, _advantages(trajs), _ones(trajs))
    return m["loss"], m["grad_norm"]


def _ones(trajs):
    return [[1.0] * len(t.response_ids) for t in trajs]


def _advantages(trajs):
    from torl.rl.grpo import group_advantages

    return group_advantages([t.reward for t in trajs], [t.group for t in trajs])


def test_micro_batch_budget_does_not_change_the_gradient(single, tiny_model_dir):
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    trajs = _batch(5, single.model)
    one = _loss_and_norm(single, trajs, 10_000, state)  # one micro-batch
    many = _loss_and_norm(single, trajs, 24, state)  # roughly one sequence per micro-batch
    assert many[0] == pytest.approx(one[0], rel=1e-5)
    assert many[1] == pytest.approx(one[1], rel=1e-5)
    single.model.load_state_dict(state)


def test_masked_behaviour_logprobs_and_masked_tokens_do_not_matter(single):
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    trajs = _batch(6, single.model)
    assert any(0 in t.loss_mask for t in trajs)
    base = _loss_and_norm(single, trajs, 10_000, state)
    for t in trajs:  # garbage where the mask is 0 (tool output): must not change the loss or the gradient
        t.logprobs = [lp if m else -50.0 for lp, m in zip(t.logprobs, t.loss_mask, strict=True)]
    assert _loss_and_norm(single, trajs, 10_000, state) == pytest.approx(base, rel=1e-6)
    for t in trajs:  # fully masked batch: nothing to train, no optimizer step
        t.loss_mask = [0] * len(t.loss_mask)
    single.model.load_state_dict(state)
    assert single._optimizer_step(trajs, _advantages(trajs), _ones(trajs)) is None


def test_mini_batches_and_epochs(single):
    """One optimizer step per prompt group per epoch; a group whose correctness does not vary is trained as given
    (dynamic sampling keeps it out of the batch before it gets here, tests/unit/test_dynamic_sampling.py) and reported
    by the same criterion: group 0 is all correct with shaped rewards that differ, and counts as zero-variance."""
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    cfg = single.cfg
    single.cfg = replace(cfg, learner=LearnerConfig(num_workers=1, mini_batch_prompts=1, epochs=2))
    try:
        trajs = _batch(7, single.model, n_groups=3)
        trajs[4].reward, trajs[5].reward = 1.0, -1.0
        trajs[8].reward, trajs[9].reward = 1.0, -1.0
        for t in trajs:
            t.correct = t.reward > 0
        for t, reward in zip(trajs[:4], [1.0, 1.0, 1.0, 0.5], strict=True):  # group 0: all correct, one overlong
            t.reward, t.correct = reward, True
        m = single.train_step(trajs)
    finally:
        single.cfg = cfg
        single.model.load_state_dict(state)
    assert m["learner/zero_var_group_share"] == pytest.approx(1 / 3)
    assert m["learner/trained_seqs"] == 12
    assert m["learner/optimizer_steps"] == 6  # 3 prompts x 2 epochs


def _exact(trajs, model):
    """The batch with behaviour log-probs equal to the model's own (what matching numerics give)."""
    with torch.no_grad():
        for t in trajs:
            lp = _hf_logprobs(model, t.prompt_ids, t.response_ids)
            t.logprobs = [float(x) if m else 0.0 for x, m in zip(lp, t.loss_mask, strict=True)]
    return trajs


@pytest.fixture(scope="module")
def recomputing(ray_cluster, tiny_model_dir):
    """Two FSDP ranks that recompute the old log-probs (the default), each rank its share, exchanged."""
    g = LearnerGroup(_cfg(old_logprobs="recompute", rollout_correction="tis", tis_cap=2.0), str(tiny_model_dir))
    yield g
    g.shutdown()


def test_recompute_with_matching_numerics_equals_the_engine_setting(recomputing, tiny_model_dir):
    """Behaviour log-probs equal to the learner's: weights 1, nothing corrected, and the step is exactly the plain
    PyTorch step with those log-probs as the old policy (what algo.old_logprobs=engine computes). On two ranks the
    correction's metrics cover both ranks' micro-batches (test_injected_mismatch checks their values)."""
    ref_model = _hf(ray_get(recomputing.state_dict_ref()), tiny_model_dir)
    trajs = _exact(_batch(0, ref_model), ref_model)
    m = recomputing.train_step(trajs)
    assert m["learner/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["learner/mismatch_max_abs_log_ratio"] < 1e-4 and m["learner/is_corrected_share"] == 0
    loss, grad_norm = _reference_step(ref_model, trajs)
    assert m["learner/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert m["learner/grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert m["learner/old_logprobs_reused"] == 1.0  # one update: the old policy is the training forward's own


def test_injected_mismatch_is_measured_and_truncated(recomputing, tiny_model_dir):
    """The engine's log-probs are off by -1 nat on every third trained token (weight e = 2.72 > cap 2): the metrics
    see exactly those tokens, and the loss is the plain step weighted by min(weight, 2) per token."""
    ref_model = _hf(ray_get(recomputing.state_dict_ref()), tiny_model_dir)
    trajs = _exact(_batch(1, ref_model), ref_model)
    bumped = 0
    for t in trajs:
        for i, m in enumerate(t.loss_mask):
            if m and i % 3 == 0:
                t.logprobs[i] -= 1.0
                bumped += 1
    total = sum(sum(t.loss_mask) for t in trajs)
    m = recomputing.train_step(trajs)
    assert m["learner/is_corrected_share"] == pytest.approx(bumped / total)
    assert m["learner/mismatch_max_abs_log_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert m["learner/is_weight_mean"] == pytest.approx(1 + bumped / total * (math.e - 1), abs=1e-4)
    # r = log(proximal / engine) = 1 on the bumped tokens, 0 elsewhere: k3 = e^1 - 1 - 1 there, k1 = -1.
    assert m["learner/mismatch_k3"] == pytest.approx(bumped / total * (math.e - 2.0), abs=1e-4)
    assert m["learner/mismatch_k1"] == pytest.approx(-bumped / total, abs=1e-4)
    # approx_kl is against the proximal policy (one update, so 0), not the engine (-bumped / total there).
    assert m["learner/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    # Reference: ratio 1 against the learner's own log-probs, each token's -A weighted by its truncated weight.
    loss = 0.0
    for t, adv in zip(trajs, map(float, _reference_advantages(trajs)), strict=True):
        w = [2.0 if m_ and i % 3 == 0 else 1.0 for i, m_ in enumerate(t.loss_mask)]
        loss += sum(-adv * wi * m_ for wi, m_ in zip(w, t.loss_mask, strict=True)) / total
    assert m["learner/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)


def test_mis_drops_the_mismatched_tokens_from_loss_and_denominator(single):
    """MIS with [0.5, 2]: the bumped tokens leave the mask; the step equals training on the batch without them."""
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    cfg = single.cfg
    trajs = _exact(_batch(2, single.model), single.model)
    for t in trajs:
        pairs = enumerate(zip(t.logprobs, t.loss_mask, strict=True))
        t.logprobs = [lp - 1.0 if m and i % 3 == 0 else lp for i, (lp, m) in pairs]
    single.cfg = replace(cfg, algo=replace(cfg.algo, old_logprobs="recompute", rollout_correction="mis"))
    try:
        m = single.train_step(trajs)
        single.model.load_state_dict(state)
        single.cfg = cfg  # engine log-probs, no correction: the same batch with the bumped tokens masked by hand
        for t in trajs:
            t.loss_mask = [0 if i % 3 == 0 else m_ for i, m_ in enumerate(t.loss_mask)]
        kept = single.train_step(_exact(trajs, single.model))
    finally:
        single.cfg = cfg
        single.model.load_state_dict(state)
    assert m["learner/is_corrected_share"] > 0.2
    assert m["learner/loss"] == pytest.approx(kept["learner/loss"], rel=1e-5, abs=1e-7)
    assert m["learner/grad_norm"] == pytest.approx(kept["learner/grad_norm"], rel=1e-5)


def test_the_learner_takes_log_probs_at_the_rollout_temperature(single):
    """rollout.temperature=0.6: the current, proximal and public log-probs are of softmax(logits / 0.6), the
    distribution the engine samples from and reports (#30). Behaviour log-probs at that temperature then give weights
    1 and nothing to correct; a learner at temperature 1 would see a mismatch of a nat or more on some tokens."""
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    cfg = single.cfg
    trajs = _batch(3, single.model)
    with torch.no_grad():
        for t in trajs:
            lp = _hf_logprobs(single.model, t.prompt_ids, t.response_ids, temperature=0.6)
            t.logprobs = [float(x) if m else 0.0 for x, m in zip(lp, t.loss_mask, strict=True)]
        at_one = _hf_logprobs(single.model, trajs[0].prompt_ids, trajs[0].response_ids)
    algo = replace(cfg.algo, old_logprobs="recompute", rollout_correction="tis")
    single.cfg = replace(cfg, rollout=replace(cfg.rollout, temperature=0.6), algo=algo)
    try:
        (lp,) = single.logprobs([(trajs[0].prompt_ids, trajs[0].response_ids)])
        m = single.train_step(trajs)
    finally:
        single.cfg = cfg
        single.model.load_state_dict(state)
    masked = [x if m_ else 0.0 for x, m_ in zip(lp, trajs[0].loss_mask, strict=True)]
    torch.testing.assert_close(torch.tensor(masked), torch.tensor(trajs[0].logprobs), rtol=0, atol=1e-5)
    assert (at_one - torch.tensor(lp)).abs().max() > 0.1
    assert m["learner/mismatch_max_abs_log_ratio"] < 1e-4 and m["learner/is_weight_mean"] == pytest.approx(1, abs=1e-4)
    assert m["learner/approx_kl"] == pytest.approx(0, abs=1e-6)  # the first step's ratio against its own proximal


def test_geometric_level_drops_the_sequences_outside_its_own_band(single):
    """algo.correction_level=geometric with mis: group 0's engine log-probs are 0.01 nat low on every model token, a
    geometric-mean weight of e^0.01 = 1.010, outside the level's own band [0.999, 1.001] (inside the token band
    [0.5, 2] it would pass): exactly group 0's tokens are dropped, the step equals training without them (#30)."""
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    cfg = single.cfg
    trajs = _exact(_batch(4, single.model), single.model)
    for t in trajs:
        if t.group == 0:
            t.logprobs = [lp - 0.01 if m else lp for lp, m in zip(t.logprobs, t.loss_mask, strict=True)]
    dropped = sum(sum(t.loss_mask) for t in trajs if t.group == 0) / sum(sum(t.loss_mask) for t in trajs)
    algo = replace(cfg.algo, old_logprobs="recompute", rollout_correction="mis", correction_level="geometric")
    single.cfg = replace(cfg, algo=algo)
    try:
        m = single.train_step(trajs)
        single.model.load_state_dict(state)
        single.cfg = cfg  # engine log-probs, no correction: group 0 masked by hand
        for t in trajs:
            t.loss_mask = [0] * len(t.loss_mask) if t.group == 0 else t.loss_mask
        kept = single.train_step(_exact(trajs, single.model))
    finally:
        single.cfg = cfg
        single.model.load_state_dict(state)
    assert m["learner/is_corrected_share"] == pytest.approx(dropped)
    assert m["learner/loss"] == pytest.approx(kept["learner/loss"], rel=1e-5, abs=1e-7)
    assert m["learner/grad_norm"] == pytest.approx(kept["learner/grad_norm"], rel=1e-5)


def test_old_log_probs_are_recomputed_in_eval_mode(single):
    """With attention dropout 0.5 the proximal pass is still the deterministic network (eval(), as veRL's
    compute_log_prob): two passes agree with each other and with the dropout-free forward, and the model is back in
    train() mode for the updates (#30). In train() mode each pass draws its own dropout masks."""
    trajs = _batch(8, single.model)
    with torch.no_grad():  # dropout 0 so far: this is the deterministic forward
        want = [_hf_logprobs(single.model, t.prompt_ids, t.response_ids).tolist() for t in trajs]
    attentions = [layer.self_attn for layer in single.model.model.layers]
    for a in attentions:
        a.attention_dropout = 0.5
    try:
        first, second = single._proximal_logprobs(trajs), single._proximal_logprobs(trajs)
        public = single.logprobs([(t.prompt_ids, t.response_ids) for t in trajs[:1]])
        training = single.model.training
    finally:
        for a in attentions:
            a.attention_dropout = 0.0
    assert first == second and training
    for got, ref in zip(first + public, want + want[:1], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=0, atol=1e-5)


REUSE_CASES = {
    # name: (learner config fields, algo fields, whether the training forward's log-probs stand in for the pass)
    "one step": ({}, {}, True),
    "one step, no correction": ({}, {"rollout_correction": "none"}, True),
    "two epochs": ({"epochs": 2}, {}, False),
    "three mini-batches": ({"mini_batch_prompts": 1}, {}, False),
    # mis rejects by the training forward's log-probs: the gradient is scaled by the step's denominators afterwards
    "mis": ({}, {"rollout_correction": "mis", "mis_low": 0.8, "mis_high": 1.25}, True),
    "mis_reject, seq-mean-token-mean": (
        {},
        {"rollout_correction": "mis_reject", "mis_low": 0.8, "mis_high": 1.25, "loss_agg": "seq-mean-token-mean"},
        True,
    ),
    "mis, two epochs": ({"epochs": 2}, {"rollout_correction": "mis", "mis_low": 0.8, "mis_high": 1.25}, False),
    "engine old log-probs": ({}, {"old_logprobs": "engine", "rollout_correction": "none"}, False),
}


@pytest.mark.parametrize("case", list(REUSE_CASES))
@pytest.mark.parametrize("stale", [False, True], ids=["on-policy", "stale"])
def test_old_log_probs_come_from_the_training_forward_only_for_a_single_update(single, case, stale, monkeypatch):
    """Skipping the proximal pass changes nothing (#30): with one optimizer step on the batch the training forward
    runs on the proximal weights, so its detached log-probs are the old policy and the correction against the engine
    is computed from them; loss, gradient norm, correction metrics and the updated weights equal the run with the
    extra forward to 1e-6, on-policy and stale (versions 3 behind: the proximal policy is the weights held now either
    way). With epochs or mini-batches > 1 the later updates see moved weights, so the pass must run (forcing the
    skip there makes the two runs differ). mis rejects tokens by the proximal log-probs, known for the loss's
    denominators only after the last forward: equal too (the gradient scaled afterwards; fails unscaled). Engine
    log-probs are noisy (ratios != 1, some truncated at 1.2 or out of mis's [0.8, 1.25], several micro-batches)."""
    fields, algo, reused = REUSE_CASES[case]
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    # Both runs start from the same Adam moments and schedule, not just the same weights.
    opt_state, sched_state = copy.deepcopy(single.optimizer.state_dict()), single.scheduler.state_dict()
    cfg = single.cfg
    trajs = _batch(9, single.model)
    for t in trajs:
        t.versions = [(-3 if stale else 0) if m else -1 for m in t.loss_mask]
    algo = {"old_logprobs": "recompute", "rollout_correction": "tis", "tis_cap": 1.2, **algo}
    single.cfg = replace(
        cfg,
        algo=replace(cfg.algo, **algo),
        learner=LearnerConfig(num_workers=1, micro_batch_tokens=40, logprob_chunk_tokens=7, **fields),
    )
    runs = []
    try:
        for force_pass in (False, True):
            single.model.load_state_dict(state)
            single.optimizer.load_state_dict(copy.deepcopy(opt_state))
            single.scheduler.load_state_dict(sched_state)
            if force_pass:  # the path that always runs the extra forward
                monkeypatch.setattr(single, "_reuses_training_forward", lambda n_minis: False)
            m = single.train_step([dataclasses.replace(t) for t in trajs])
            grads = {n: p.grad.clone() for n, p in single.model.named_parameters() if p.grad is not None}
            runs.append((m, grads, {k: v.clone() for k, v in single.model.state_dict().items()}))
    finally:
        monkeypatch.undo()
        single.cfg = cfg
        single.model.load_state_dict(state)
    (got, got_grads, got_sd), (want, want_grads, want_sd) = runs
    assert got["learner/old_logprobs_reused"] == float(reused)
    assert want["learner/old_logprobs_reused"] == 0.0
    if algo["rollout_correction"] != "none":
        assert want["learner/is_corrected_share"] > 0
    for k in ("loss", "grad_norm", "clip_frac", "approx_kl", "is_corrected_share", "is_weight_mean", "mismatch_k3"):
        assert got[f"learner/{k}"] == pytest.approx(want[f"learner/{k}"], rel=1e-6, abs=1e-6), k
    assert got_grads.keys() == want_grads.keys() and want_grads
    for k, v in want_grads.items():  # the last optimizer step's (clipped) gradient
        torch.testing.assert_close(got_grads[k], v, rtol=0, atol=1e-6, msg=k)
    for k, v in want_sd.items():
        torch.testing.assert_close(got_sd[k], v, rtol=0, atol=1e-6, msg=k)


def test_dropout_keeps_the_proximal_pass(single):
    """A train() forward with dropout is not the eval() policy: the proximal pass runs even for a single update."""
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    cfg = single.cfg
    trajs = _batch(10, single.model)
    single.cfg = replace(cfg, algo=replace(cfg.algo, old_logprobs="recompute", rollout_correction="tis"))
    attentions = [layer.self_attn for layer in single.model.model.layers]
    try:
        assert single.train_step(trajs)["learner/old_logprobs_reused"] == 1.0
        single.model.load_state_dict(state)
        for a in attentions:
            a.attention_dropout = 0.5
        assert single.train_step(trajs)["learner/old_logprobs_reused"] == 0.0
    finally:
        for a in attentions:
            a.attention_dropout = 0.0
        single.cfg = cfg
        single.model.load_state_dict(state)
