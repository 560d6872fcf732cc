"""The training job end to end on the tiny model: a few real steps through Ray, vLLM, the sandbox and FSDP.

Checks what a short CI run can: rewards are finite, weights change and reach the generator (its policy version
advances), checkpoints are complete, pipelining records staleness, resume continues from the last checkpoint, and
bad config fails before any actor starts. One three-step run per staleness bound serves every test that reads it
(each used to start the same job itself, a minute of actor start-up and training on this CPU).
"""

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.train import main as train_main


def _args(model_dir, out, steps, staleness):
    return [
        f"model.path={model_dir}",
        "model.recipe=",
        f"trainer.output_dir={out}",
        f"trainer.total_steps={steps}",
        f"trainer.max_staleness={staleness}",
        "trainer.val_every=2",
        "trainer.save_every=2",
        "trainer.log_samples_every=1",
        "data.batch_size=4",
        "data.val_limit=4",
        "rollout.n=4",
        "rollout.max_response_tokens=48",
        "rollout.engine.max_num_seqs=32",
        "sandbox.num_workers=1",
        # The tiny test model is rarely right, so most groups have equal rewards and zero advantage; a small entropy
        # bonus guarantees a non-zero gradient, so "weights change" is checked on every run.
        "algo.entropy_coef=0.01",
        "optim.lr=1e-3",
        "wandb.mode=disabled",
    ]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_resumed_at(printed: str, ckpt: Path, step: int, before: list[dict], after: list[dict]) -> None:
    """The run resumed from ``ckpt`` at ``step``: it says so, and the rows of steps up to ``step`` (``before``: the
    interrupted run's) are kept, their timestamps too. Runs are deterministic here, so a resume that silently
    started afresh, or from an older checkpoint, would rewrite rows with the same steps and figures."""
    assert f"[torl] resumed from {ckpt} at step {step}" in printed
    kept = [r for r in before if r["step"] <= step]
    assert kept and [r for r in after if r["step"] <= step] == kept


def _shared_args(model_dir, out, staleness):
    """The shared runs' arguments: three steps, validation before training and at the end, checkpoints at steps 2
    and 3. A run resumed from one of them takes the same arguments (and the checkpoint)."""
    return [*_args(model_dir, out, 3, staleness), "trainer.val_every=3"]


@pytest.fixture(scope="module")
def three_step_run(ray_cluster, tiny_model_dir, tmp_path_factory) -> Callable[[int], Path]:
    """The output directory of a three-step run at a staleness bound, run once per module: the plain tests read it,
    the exact-resume tests compare their step 3 with it. Tests must not write into the returned directory."""
    runs: dict[int, Path] = {}

    def run(staleness: int) -> Path:
        if staleness not in runs:
            out = tmp_path_factory.mktemp(f"three_steps_staleness{staleness}") / "run"
            assert train_main(_shared_args(tiny_model_dir, out, staleness)) == 0
            runs[staleness] = out
        return runs[staleness]

    return run


@pytest.mark.parametrize("staleness", [0, 1])
def test_train_steps_update_weights_and_reach_the_generator(three_step_run, tiny_model_dir, staleness):
    out = three_step_run(staleness)

    rows = {r["step"]: r for r in _metrics(out)}
    assert set(rows) == {0, 1, 2, 3}  # step 0 = validation before training
    for step in (1, 2, 3):
        assert math.isfinite(rows[step]["reward/mean"]) and math.isfinite(rows[step]["learner/grad_norm"])
        assert rows[step]["rollout/trajectories"] == 16
    assert "val/acc/mean" in rows[3] and "val/acc/mean" not in rows[2]
    if staleness == 0:  # step 2's rollout started after the first weight push: every token is on-policy
        assert rows[2]["rollout/policy_version"] == 1 and rows[2]["staleness/mean"] == 0
    else:  # it started before the push, so its first tokens are one update behind (later ones may be fresh)
        assert 0 < rows[2]["staleness/mean"] <= 1 and rows[2]["staleness/max"] == 1

    ckpt = out / "step_000002"
    assert (ckpt / "COMPLETE").is_file()
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(ckpt / "model.safetensors")
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert changed, "no weight changed after two optimizer steps"
    assert (out / "samples.jsonl").is_file()


def test_resume_continues_from_the_last_checkpoint_exactly(three_step_run, tiny_model_dir, tmp_path, capsys):
    """Stopped after step 3 was logged but before its checkpoint, the same command resumes from step 2's checkpoint,
    drops step 3's stale row, and its step 3 equals the uninterrupted run's (on-policy: the same weights, optimizer
    and RNG state, prompts and sampling seeds). It runs in a copy of the shared on-policy run, which is the
    uninterrupted run compared against."""
    whole = three_step_run(0)
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    shutil.rmtree(out / "step_000003")
    first = _metrics(out)
    assert [r["step"] for r in first] == [0, 1, 2, 3]
    assert train_main([*_shared_args(tiny_model_dir, out, 0), "trainer.val_before_train=true"]) == 0
    _assert_resumed_at(capsys.readouterr().out, out / "step_000002", 2, first, _metrics(out))
    steps = [r["step"] for r in _metrics(out)]
    assert steps == [0, 1, 2, 3], steps  # no second validation at step 0, no retrained steps, step 3 logged once
    state = json.loads((out / "step_000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["sampler"]["position"] == 3 * 4

    resumed, straight = _metrics(out)[-1], _metrics(whole)[-1]
    assert resumed["step"] == straight["step"] == 3
    for key in ("reward/mean", "response/length_mean", "rollout/tokens", "learner/loss", "learner/grad_norm"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.path=/nonexistent/model", "no Hugging Face checkpoint"),
        ("data.train_files=[/nonexistent.parquet]", "nonexistent.parquet"),
        ("learner.mini_batch_prompts=3", "not divisible"),
        ("rollout.max_response_tokens=5000", "context too short"),
        ("rollout.nn=3", "did you mean"),
    ],
)
def test_bad_config_fails_before_actors_start(tiny_model_dir, tmp_path, capsys, override, message):
    args = [f"model.path={tiny_model_dir}", "model.recipe=", f"trainer.output_dir={tmp_path}", override]
    assert train_main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("k", [1, 2])
def test_staleness_bound_k_and_resume_trains_the_stored_rollouts_ahead(three_step_run, tiny_model_dir, tmp_path, k):
    """Rollouts of steps t+1..t+k run while step t trains, so no trained token is more than k versions behind, and
    step 3 (started before a push that lands mid-rollout) has tokens exactly k behind. A checkpoint at step 2 has
    step 3's rollout in flight, sampled on weights no checkpoint holds: it is finished and stored in the checkpoint,
    and the resumed run's step 3 is the uninterrupted run's step 3 (same trajectories, same update)."""
    out = three_step_run(k)
    rows = {r["step"]: r for r in _metrics(out) if r["step"] > 0}
    assert all(r["staleness/max"] <= k for r in rows.values())
    assert rows[3]["staleness/max"] == k and rows[3][f"staleness/share_lag_{k}"] > 0
    state = json.loads((out / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler"]["position"] == 3 * 4  # step 3's batch is drawn and stored
    (stored,) = state["rollouts_ahead"]
    assert len(stored["trajectories"]) == 16

    again = tmp_path / "resumed"
    resume = [f"trainer.resume={out / 'step_000002'}", f"trainer.output_dir={again}"]
    assert train_main([*_shared_args(tiny_model_dir, out, k), *resume]) == 0
    (resumed,) = _metrics(again)
    assert resumed["step"] == 3
    for key in ("reward/mean", "response/length_mean", "rollout/tokens", "staleness/mean", "learner/loss",
                "learner/grad_norm"):  # fmt: skip
        assert resumed[key] == pytest.approx(rows[3][key], rel=1e-5, abs=1e-7), key

    def ids(run_dir, step):
        rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        return sorted(r["id"] for r in rows if r["step"] == step)

    assert ids(again, 3) == ids(out, 3)


def test_dynamic_sampling_refills_the_batch_with_varied_groups(ray_cluster, tmp_path):
    """DAPO's dynamic sampling on the shipped base model (right about a third of the time, so some groups of 4 are
    all wrong): every step trains on exactly data.batch_size groups, each with some answers right and some wrong."""
    out = tmp_path / "run"
    base = "models/torl-tiny-base"
    args = [*_args(base, out, 2, 0), "model.recipe=configs/base_model.yaml", "trainer.val_every=0"]
    args += ["algo.dynamic_sampling=true", "algo.dynamic_sampling_max_draws=10", "rollout.max_response_tokens=96"]
    assert train_main(args) == 0
    rows = [r for r in _metrics(out) if r["step"] > 0]
    for r in rows:
        assert r["dynamic/batch_groups"] == 4 and r["learner/trained_seqs"] == 16
        assert r["learner/zero_var_group_share"] == 0  # only varied groups reached the learner
        assert r["dynamic/groups_seen"] >= 4 and r["dynamic/varied_share"] <= 1
    assert sum(r["dynamic/draws"] for r in rows) > len(rows), "no step needed a refill: the test proves nothing"


def test_dynamic_sampling_stops_at_its_bound_with_a_warning(ray_cluster, tiny_model_dir, tmp_path, capsys):
    """Every reward equal (+1 right or wrong) and groups filtered by reward: no group ever varies, so each step stops
    after max_draws rollout batches, warns, skips the update and still pushes (one weight version per step)."""
    out = tmp_path / "run"
    args = [*_args(tiny_model_dir, out, 1, 0), "trainer.val_every=0", "trainer.val_before_train=false"]
    args += ["algo.dynamic_sampling=true", "algo.dynamic_sampling_max_draws=3", "reward.wrong=1.0"]
    args += ["algo.dynamic_sampling_metric=reward"]
    assert train_main(args) == 0
    (row,) = _metrics(out)
    assert row["dynamic/draws"] == 3 and row["dynamic/groups_seen"] == 12 and row["dynamic/batch_groups"] == 0
    assert "learner/trained_seqs" not in row
    printed = capsys.readouterr()
    assert "0 of 4 prompt groups vary in reward after 3 rollout batches" in printed.out + printed.err
