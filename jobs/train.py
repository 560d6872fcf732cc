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

import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.loop import train  # noqa: E402
from jobs.run import Run  # noqa: E402
from jobs.setup_run import load_run_config, prepare_run, run_preflight  # noqa: E402
from torl.config import Config, ConfigError  # noqa: E402
from torl.config_help import format_help, wants_help  # noqa: E402
from torl.config_load import split_cli  # noqa: E402
from torl.data.problems import DataError  # noqa: E402
from torl.infra.storage import StorageError  # noqa: E402
from torl.rollout.metrics import analysis_figures  # noqa: E402
from torl.rollout.types import LearnerDied  # noqa: E402
from torl.sandbox.health import SandboxUnhealthy  # noqa: E402


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
    from torl.infra.checkpoint import latest_checkpoint

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
    from torl.infra.checkpoint import latest_checkpoint

    out = _short(Path(run.cfg.trainer.output_dir))
    lines = [f"[torl] done: {run.total_steps} steps in {wall_s / 60:.1f} min (wall, set-up included)"]
    if validations:
        (first, a), (last, b) = validations[0], validations[-1]
        k = run.cfg.trainer.val_samples
        for prefix, title in (("val/", "greedy"), ("val_sampled/", f"sampled, {k} each")):
            rows = [(key, label, fmt) for key, label, fmt in analysis_figures(b, prefix) if key in a and key in b]
            if rows:  # ToRL's analyses (torl.rollout.metrics)
                head = f"held-out, {title} ({len(run.val)} problems)"
                lines.append(f"  {head:<36} {f'step {first}':>9} {f'step {last}':>9}")
                for key, label, fmt in rows:
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
