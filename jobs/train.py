"""Tool-integrated GRPO training (ToRL) on a Ray cluster.

    python jobs/train.py [configs/preset.yaml ...] [key=value ...]          # embedded local cluster
    python jobs/train.py configs/torl_7b.yaml model.path=Qwen2.5-Math-7B preflight.only=true \
        preflight.gpus=8 preflight.gpu_memory_gb=80 preflight.cpus=96      # will it fit? (no cluster needed)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py key=value ...

With no preset, configs/tiny_cpu.yaml is used: the project's small base model (built once, cached) trained on the
synthetic tool tasks in minutes on a CPU. Each step: sample prompts -> roll out n trajectories each through the tool
loop -> grade -> GRPO update -> push weights to the generators; validation and checkpoints every k steps.
With trainer.max_staleness=k the rollouts of steps t+1..t+k run while the learner trains step t.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.setup_run import Run, load_run_config, prepare_run, run_preflight  # noqa: E402
from torl.config import Config, ConfigError, split_cli  # noqa: E402
from torl.config_help import format_help, wants_help  # noqa: E402
from torl.data import DataError  # noqa: E402
from torl.dynamic_sampling import VariedBatch, draw_seed_step  # noqa: E402
from torl.grading import overlong_penalty  # noqa: E402
from torl.metrics import analysis_figures, rollout_metrics  # noqa: E402
from torl.problem_rewards import record_problem_rewards  # noqa: E402
from torl.progress import Progress  # noqa: E402
from torl.rollout import filter_void_turns  # noqa: E402
from torl.sampler import SamplerState  # noqa: E402
from torl.sandbox_health import HealthGate, SandboxUnhealthy  # noqa: E402
from torl.storage import StorageError  # noqa: E402
from torl.types import LearnerDied, Trajectory  # noqa: E402

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


@contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall seconds of the block under ``key`` (veRL's marked_timer, without the profiler hooks)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = time.perf_counter() - t0


def grade(run: Run, trajs: list[Trajectory], shape: bool = True) -> None:
    """Rewards and verdicts; ``shape`` adds DAPO's overlong punishment and filtering (training batches only)."""
    import ray

    verdicts = ray.get(run.grader.grade.remote([t.grade_item() for t in trajs]))
    rc, limit = run.cfg.reward, run.cfg.rollout.max_response_tokens
    for t, (reward, correct) in zip(trajs, verdicts, strict=True):
        t.reward, t.correct = reward, correct
        if not shape:
            continue
        t.reward += overlong_penalty(len(t.response_ids), limit, rc.overlong_buffer, rc.overlong_penalty)
        if rc.mask_truncated and t.finish_reason == "length":
            t.loss_mask = [0] * len(t.loss_mask)


def problem_levels(run: Run) -> dict[str, str]:
    """The difficulty level of each training and held-out problem that has one (the ``level/`` metrics)."""
    return {e.problem.id: e.problem.level for e in [*run.sampler.items, *run.val] if e.problem.level}


def validate(run: Run, step: int, levels: dict[str, str]) -> dict[str, float]:
    times: dict[str, float] = {}
    with timed(times, "time/validate"):
        trajs, _ = run.collect(run.generate(run.val, greedy=True, n=1))
        grade(run, trajs, shape=False)
    metrics = {**rollout_metrics(trajs, "val/", levels, run.cfg.tool.max_calls), **times}
    if run.cfg.trainer.log_samples_every:
        run.tracker.log_samples(step, trajs, limit=8)
    return metrics


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
        if gate is not None:  # the sandbox's own failures over the last steps (torl.sandbox_health)
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


def keep_varied(
    run: Run, trajs: list[Trajectory], step: int, metrics: dict[str, float], say: Callable[[str], None]
) -> list[Trajectory]:
    """DAPO's dynamic sampling (``torl.dynamic_sampling``): this step's groups that vary by
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


def staleness_metrics(trajs: list[Trajectory], version: int) -> dict[str, float]:
    """How many weight updates behind the learner each sampled token is (0 = on-policy)."""
    lags = [version - v for t in trajs for v, m in zip(t.versions, t.loss_mask, strict=True) if m]
    if not lags:
        return {}
    out = {"staleness/mean": sum(lags) / len(lags), "staleness/max": float(max(lags))}
    # Histogram as shares per lag (a flat float per key, so metrics.jsonl and W&B plot it alike).
    out.update({f"staleness/share_lag_{lag}": lags.count(lag) / len(lags) for lag in sorted(set(lags))})
    return out


def main(argv: list[str]) -> int:
    if wants_help(argv):
        print(format_help(Config, usage=__doc__.strip()))
        return 0
    t_start = time.perf_counter()
    try:
        cfg = load_run_config(argv)
        if cfg.preflight.only:  # the table for this machine or the preflight.* overrides; nothing starts
            run_preflight(cfg, cfg.model.path, None, cfg.trainer.total_steps)
            return 0
        run = prepare_run(argv, job="train")
    except (ConfigError, DataError) as exc:
        print(f"[torl] {'config' if isinstance(exc, ConfigError) else 'data'} error: {exc}", file=sys.stderr)
        return 2
    except SandboxUnhealthy as exc:  # the start-up probe: nothing was trained
        print(f"[torl] sandbox unhealthy, not started: {exc}", file=sys.stderr)
        return 1
    # Ray job stop sends SIGTERM: turn it into KeyboardInterrupt so actors are shut down cleanly below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        validations = train(run)
        wandb_at = run.tracker.wandb_location()
    except KeyboardInterrupt:
        print("[torl] interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    except SandboxUnhealthy as exc:
        last = _stored_checkpoint(run)
        where = f"from {last}" if last else "from the start (no checkpoint yet)"
        print(f"[torl] stopped, sandbox unhealthy: {exc}\n[torl] fix the sandbox, then run the same command again to"
              f" resume {where}", file=sys.stderr)  # fmt: skip
        return 1
    except LearnerDied as exc:
        last = _stored_checkpoint(run)
        where = f"from {last}" if last else "from the start (no checkpoint yet)"
        print(f"[torl] stopped: {exc}\n[torl] run the same command again to resume {where}", file=sys.stderr)
        return 1
    finally:
        run.close()
    print(final_summary(run, validations, time.perf_counter() - t_start, wandb_at, argv))
    return 0


def _stored_checkpoint(run: Run) -> str | Path | None:
    """The newest complete checkpoint where a resume looks for it: trainer.storage_path if set, else output_dir."""
    from torl.checkpoint import latest_checkpoint

    if run.storage is None:
        return latest_checkpoint(run.cfg.trainer.output_dir)
    try:
        name = run.storage.latest()
    except StorageError as exc:
        return f"(storage not readable: {exc})"
    return run.storage.location(name) if name else None


def _short(path: Path) -> Path:
    """``path`` relative to the working directory when it lies inside it (what a user would type)."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def final_summary(
    run: Run, validations: list[tuple[int, dict[str, float]]], wall_s: float, wandb_at: str, argv: list[str]
) -> str:
    """What a user wants at the end: held-out figures before and after, where things are, what to run next."""
    from jobs.plot_run import load, plot
    from torl.checkpoint import latest_checkpoint

    out = _short(Path(run.cfg.trainer.output_dir))
    lines = [f"[torl] done: {run.total_steps} steps in {wall_s / 60:.1f} min (wall, set-up included)"]
    if validations:
        (first, a), (last, b) = validations[0], validations[-1]
        lines.append(f"  {f'held-out, greedy ({len(run.val)} problems)':<36} {f'step {first}':>9} {f'step {last}':>9}")
        for key, label, fmt in analysis_figures(b, prefix="val/"):  # ToRL's analyses (torl.metrics)
            if key in a and key in b:
                lines.append(f"    {label:<34} {fmt.format(a[key]):>9} {fmt.format(b[key]):>9}")
    ckpt = latest_checkpoint(out)
    ckpt = _short(ckpt) if ckpt else None
    curves = out / "curves.png"
    try:
        plot(load(out), curves, str(out))
    except (OSError, SystemExit, ValueError) as exc:  # a plotting problem must not hide the result above
        curves = Path(f"(not drawn: {exc})")
    stored = _stored_checkpoint(run) if run.storage is not None else None
    if run.storage is not None:
        try:
            run.storage.upload_files(out, ["curves.png"])
        except StorageError as exc:
            print(f"[torl] warning: curves.png not stored: {exc}", file=sys.stderr)
    preset = " ".join(split_cli(argv)[0]) or "configs/tiny_cpu.yaml"  # argv was parsed once already: it splits
    lines += [
        f"  checkpoint   {ckpt or '(none saved: trainer.save_every=0)'}",
        *([f"  stored       {stored or '(none)'} (trainer.storage_path)"] if run.storage is not None else []),
        f"  curves       {curves}",
        f"  metrics      {out / 'metrics.jsonl'}",
        f"  W&B          {wandb_at}",
    ]
    if ckpt is not None:
        py = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd() + os.sep) else "python"
        lines += [
            "  next:",
            f"    evaluate   {py} jobs/eval.py {preset} --checkpoint {out}",
            f"    serve      {py} jobs/serve.py --checkpoint {ckpt} {preset}",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
