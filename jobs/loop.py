"""The training loop, one step top to bottom: take a rollout, grade it, keep the varied groups, train, push weights.

``train`` is the loop; below it are its parts in the order a step meets them (``RolloutQueue``, ``grade``,
``keep_varied``, ``staleness_metrics``, ``validate``). What it asks of the actors goes through ``Run``
(jobs/run.py); ``python jobs/train.py`` is the entry point that builds the run and calls ``train``.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from jobs.run import Run
from torl.data.problem_rewards import record_problem_rewards
from torl.data.sampler import SamplerState
from torl.infra.progress import Progress
from torl.infra.storage import StorageError
from torl.rl.dynamic_sampling import VariedBatch, draw_seed_step
from torl.rl.grading import overlong_penalty
from torl.rollout.metrics import rollout_metrics
from torl.rollout.tool_loop import filter_void_turns
from torl.rollout.types import Trajectory
from torl.sandbox.health import HealthGate, SandboxUnhealthy

# What the progress bar shows per step, and the held-out line per validation: (metric, label, format).
STEP_FIGURES = [
    ("reward/mean", "reward", "{:+.2f}"),
    ("acc/mean", "acc", "{:.2f}"),
    ("tool/code_ratio", "code", "{:.2f}"),
    ("time/step", "s/step", "{:.1f}"),
]
VAL_FIGURES = [
    ("val/acc/mean", "accuracy", "{:.3f}"),
    ("val/tool/code_ratio", "code ratio", "{:.2f}"),
    ("val/tool/exec_success", "exec ok", "{:.2f}"),
]


def train(run: Run) -> list[tuple[int, dict[str, float]]]:
    """The training loop; returns the validation figures it measured, as (step, metrics), for the final summary."""
    cfg, tracker = run.cfg, run.tracker
    step, total = run.start_step, run.total_steps
    validations: list[tuple[int, dict[str, float]]] = []
    bar: Progress | None = None
    levels = problem_levels(run)

    def run_validation(at: int) -> dict[str, float]:
        metrics = validate(run, at, levels)
        validations.append((at, metrics))
        (bar.write if bar else print)(f"[torl] step {at} held-out: " + tracker.summary(metrics, VAL_FIGURES))
        return metrics

    if cfg.trainer.val_before_train and step == 0 and run.val:
        tracker.log(0, run_validation(0))
    bar = Progress(total, "train", unit="step", initial=step, log_every_s=0.0)

    gate = HealthGate.from_config(cfg.sandbox) if cfg.tool.enabled else None
    ahead = cfg.trainer.max_staleness
    rollouts = RolloutQueue(run, start=step, total=total, restored=run.restored_rollouts)
    saved: dict[str, float] = {}
    rollouts.fill(1)
    while step < total:
        t_step = time.perf_counter()
        trajs, metrics = rollouts.next()  # waits only for what the pipelined rollout has not finished yet
        metrics["time/wait_rollout"] = time.perf_counter() - t_step
        version = step  # weights version the learner holds now
        rollouts.fill(ahead)  # rollouts of up to k later steps run while this one trains

        with timed(metrics, "time/grade"):
            grade(run, trajs)
        record_problem_rewards(cfg.trainer.output_dir, step + 1, trajs)  # LIMR's per-problem reward curves
        metrics.update(rollout_metrics(trajs, levels=levels, max_calls=cfg.tool.max_calls))
        if gate is not None:  # the sandbox's own failures over the last steps (torl.sandbox.health)
            verdict = gate.observe([c for t in trajs for c in t.tool_calls])
            metrics.update(verdict.metrics())
            if verdict.level == "stop":
                raise SandboxUnhealthy(f"step {step + 1}: {verdict.message}")
            if verdict.level == "warn":
                bar.write(f"[torl] warning: step {step + 1}: {verdict.message}")
        if cfg.algo.dynamic_sampling:
            with timed(metrics, "time/dynamic_sampling"):
                trajs = keep_varied(run, trajs, step + 1, metrics, bar.write)
        if cfg.algo.filter_void_turns:  # SimpleTIR: trajectories with a void turn get no gradient
            metrics["algo/void_filtered_share"] = filter_void_turns(trajs)
        metrics.update(staleness_metrics(trajs, version))
        step += 1
        if trajs:  # empty only when dynamic sampling found no varied group
            with timed(metrics, "time/train"):
                metrics.update(run.learner.train_step(trajs, rollouts.in_flight()))
        with timed(metrics, "time/sync"):
            run.push_weights(step)  # also after a skipped update: every step is one weight version

        rollouts.fill(1)  # on-policy: the next rollout starts on the weights just pushed
        if run.val and cfg.trainer.val_every and (step % cfg.trainer.val_every == 0 or step == total):
            metrics.update(run_validation(step))
        if cfg.trainer.log_samples_every and step % cfg.trainer.log_samples_every == 0:
            tracker.log_samples(step, trajs)
        metrics.update(run.health_metrics())
        metrics.update(saved)  # the previous step's checkpoint, if one was written
        metrics["time/step"] = time.perf_counter() - t_step
        metrics["perf/tokens_per_s"] = metrics.get("rollout/tokens", 0.0) / max(metrics["time/step"], 1e-9)
        # Logged before the checkpoint: a stop between the two then redoes this step and logs it again (the resume
        # drops its first row), where the other order would lose the row of a step that is never redone.
        tracker.log(step, metrics)
        bar.update(1, **tracker.figures(metrics, STEP_FIGURES))
        saved = {}
        if cfg.trainer.save_every and (step % cfg.trainer.save_every == 0 or step == total):
            with timed(saved, "time/save_wait_rollout"):
                resume_at, finished = rollouts.checkpoint()  # pipelined: the rollouts ahead, finished, go in it
            with timed(saved, "time/save"):
                try:
                    run.save(step, resume_at, finished)
                except StorageError as exc:  # complete on the learner's node; the next save stores a newer one
                    bar.write(f"[torl] warning: step {step}: {exc}")
    bar.close()
    rollouts.drain()
    return validations


Rollout = tuple[list[Trajectory], dict[str, float]]


class RolloutQueue:
    """Rollouts started ahead of training, oldest first: each a list of generator shards still running, or a finished
    ``Rollout`` (one restored from a checkpoint, or settled for one).

    ``fill(k)`` keeps k rollouts started beyond the batch being trained (``trainer.max_staleness``): the engine then
    samples at most k weight versions behind the learner. A checkpoint must resume to the same run: on-policy the one
    rollout pending was started on the checkpoint's own weights, so a resumed run redoes it exactly from the sampler
    state before it; pipelined, the pending rollouts were sampled (partly) on older weights than any checkpoint holds,
    so they are finished and stored in the checkpoint, and a resumed run trains on exactly those, first, whatever
    staleness it resumes with (at 0 they are stored again until trained: the sampler has moved past them).
    """

    def __init__(self, run: Run, start: int, total: int, restored: list[Rollout] | None = None) -> None:
        self.run, self.total = run, total
        self.pending: deque[tuple[list | Rollout, SamplerState]] = deque(
            (r, copy.copy(run.sampler.state)) for r in restored or []
        )
        self.started = start + len(self.pending)

    def fill(self, ahead: int) -> None:
        while len(self.pending) < ahead and self.started < self.total:
            batch, before = self.run.draw()
            self.started += 1
            self.pending.append((self.run.generate(batch, step=self.started), before))

    def next(self) -> Rollout:
        self.fill(1)
        work, _ = self.pending.popleft()
        return self._finished(work)

    def _finished(self, work: list | Rollout) -> Rollout:
        """The rollout ``work`` stands for, waiting for its shards if they still run."""
        return work if isinstance(work, tuple) else self.run.collect(work)

    def in_flight(self) -> list:
        """Refs of the rollouts started ahead and still running (the learner widens its threads once they finish)."""
        return [shard.ref for work, _ in self.pending if not isinstance(work, tuple) for shard in work]

    def checkpoint(self) -> tuple[SamplerState, list[Rollout]]:
        """What a checkpoint records to resume this queue: the sampler state to continue from, and the finished
        rollouts to train on first (pipelined, or restored from a pipelined checkpoint and not trained yet; a rollout
        started on-policy is redone instead, see the class docstring)."""
        if not self.pending:
            return copy.copy(self.run.sampler.state), []
        # On-policy the pending rollout is redone, unless it is one restored from a pipelined checkpoint (resumed at
        # staleness 0): its sampler state is the one after it, and it was sampled on weights no checkpoint holds.
        if self.run.cfg.trainer.max_staleness == 0 and not isinstance(self.pending[0][0], tuple):
            return copy.copy(self.pending[0][1]), []
        self.pending = deque((self._finished(work), before) for work, before in self.pending)
        return copy.copy(self.run.sampler.state), [work for work, _ in self.pending]

    def drain(self) -> None:
        while self.pending:
            self._finished(self.pending.popleft()[0])


def grade(run: Run, trajs: list[Trajectory], shape: bool = True) -> None:
    """Rewards and verdicts; ``shape`` adds DAPO's overlong punishment and filtering and the price of each tool call
    (training batches only: a held-out score stays the share answered correctly)."""
    import ray

    verdicts = ray.get(run.grader.grade.remote([t.grade_item() for t in trajs]))
    rc, limit = run.cfg.reward, run.cfg.rollout.max_response_tokens
    for t, (reward, correct) in zip(trajs, verdicts, strict=True):
        t.reward, t.correct = reward, correct
        if not shape:
            continue
        t.reward += overlong_penalty(len(t.response_ids), limit, rc.overlong_buffer, rc.overlong_penalty)
        t.reward -= rc.tool_call_cost * len(t.tool_calls)
        if rc.mask_truncated and t.finish_reason == "length":
            t.loss_mask = [0] * len(t.loss_mask)


def keep_varied(
    run: Run, trajs: list[Trajectory], step: int, metrics: dict[str, float], say: Callable[[str], None]
) -> list[Trajectory]:
    """DAPO's dynamic sampling (``torl.rl.dynamic_sampling``): this step's groups that vary by
    ``algo.dynamic_sampling_metric``, topped up from further prompt batches (rolled out on the current weights, each
    draw seeded by ``step`` and its index, ``draw_seed_step``) to ``data.batch_size`` groups."""
    cfg = run.cfg
    batch = VariedBatch(cfg.data.batch_size, cfg.algo.dynamic_sampling_metric)
    batch.add(trajs)
    while not batch.full and batch.draws < cfg.algo.dynamic_sampling_max_draws:
        prompts, _ = run.draw()
        extra, _ = run.collect(run.generate(prompts, step=draw_seed_step(step, batch.draws)))
        grade(run, extra)
        batch.add(extra)
    metrics.update(batch.metrics())
    if not batch.full:
        say(
            f"[torl] warning: step {step}: {len(batch.groups)} of {batch.want} prompt groups vary in {batch.metric} "
            f"after {batch.draws} rollout batches (algo.dynamic_sampling_max_draws); "
            + ("training on those" if batch.groups else "no update this step")
        )
    return batch.trajectories()


def staleness_metrics(trajs: list[Trajectory], version: int) -> dict[str, float]:
    """How many weight updates behind the learner each sampled token is (0 = on-policy)."""
    lags = [version - v for t in trajs for v, m in zip(t.versions, t.loss_mask, strict=True) if m]
    if not lags:
        return {}
    out = {"staleness/mean": sum(lags) / len(lags), "staleness/max": float(max(lags))}
    # Histogram as shares per lag (a flat float per key, so metrics.jsonl and W&B plot it alike).
    out.update({f"staleness/share_lag_{lag}": lags.count(lag) / len(lags) for lag in sorted(set(lags))})
    return out


def validate(run: Run, step: int, levels: dict[str, str]) -> dict[str, float]:
    """Held-out figures: greedy (``val/``, ToRL's validation) and, with ``trainer.val_samples``, sampled at the
    rollout's temperature (``val_sampled/``, seeded by ``step``)."""
    times: dict[str, float] = {}
    max_calls, k = run.cfg.tool.max_calls, run.cfg.trainer.val_samples
    with timed(times, "time/validate"):
        greedy = run.generate(run.val, greedy=True, n=1)
        sampled = run.generate(run.val, greedy=False, n=k, step=step) if k else []  # in flight beside the greedy
        trajs, _ = run.collect(greedy)
        grade(run, trajs, shape=False)
        metrics = rollout_metrics(trajs, "val/", levels, max_calls)
        if k:
            samples, _ = run.collect(sampled)
            grade(run, samples, shape=False)
            metrics.update(rollout_metrics(samples, "val_sampled/", levels, max_calls))
    metrics.update(times)
    if run.cfg.trainer.log_samples_every:
        run.tracker.log_samples(step, trajs, limit=8)
    return metrics


def problem_levels(run: Run) -> dict[str, str]:
    """The difficulty level of each training and held-out problem that has one (the ``level/`` metrics)."""
    return {e.problem.id: e.problem.level for e in [*run.sampler.items, *run.val] if e.problem.level}


@contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall seconds of the block under ``key`` (veRL's marked_timer, without the profiler hooks)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = time.perf_counter() - t0
