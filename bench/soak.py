"""Memory over a long run: the RSS of every actor process, sampled while the CPU default trains, and its slope.

    .venv/bin/python bench/soak.py [--steps 200] [--every 2.0] [key=value ...]

Runs the training job in this process (its own local Ray cluster) for ``--steps`` steps and samples, every
``--every`` seconds, the RSS of each Ray actor process (``ray::<Class>``: generators, learner, sandbox workers,
grader) and of each process below it (vLLM's engine core, the sandbox zygote). The step a sample belongs to is the
number of rows in the run's metrics.jsonl. After a warm-up (the first 10% of steps: allocators and caches filling)
it fits a least-squares line of RSS against step per process and prints MB per 100 steps, also over the second half
alone (a leak shows as a steady positive slope in both; caches filling, such as the engine's KV blocks being touched
for the first time, flatten out; the target is under 5). A process that was replaced (a fault) shows as two rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _label(proc: psutil.Process) -> str | None:
    cmd = " ".join(proc.cmdline())
    if cmd.startswith("ray::"):
        return cmd.split()[0].split(".")[0]  # ray::Generator, ray::Learner, ray::SandboxWorker, ...
    return None


def sample(into: dict[tuple[str, int], list[tuple[int, float]]], step: int) -> None:
    """One RSS reading (MB) of every actor process of this run's cluster (all descend from this process: it
    started Ray) and of the processes below them, keyed by (role, pid)."""
    for proc in psutil.Process().children(recursive=True):
        try:
            label = _label(proc)
            if label is None:
                continue
            into[(label, proc.pid)].append((step, proc.memory_info().rss / 2**20))
            for child in proc.children(recursive=True):
                name = "engine core" if "EngineCore" in " ".join(child.cmdline()) else "child"
                into[(f"{label} > {name}", child.pid)].append((step, child.memory_info().rss / 2**20))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def slope_per_100(points: list[tuple[int, float]]) -> float:
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(m for _, m in points) / n
    var = sum((s - mx) ** 2 for s, _ in points)
    return 100 * sum((s - mx) * (m - my) for s, m in points) / var if var else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from jobs.train import main as train_main

    out = Path(tempfile.mkdtemp(prefix="torl-soak-"))
    overrides = [
        f"trainer.output_dir={out}",
        f"trainer.total_steps={args.steps}",
        "trainer.val_every=0",
        "trainer.save_every=50",
        "trainer.log_samples_every=0",
        "wandb.mode=disabled",
        *args.overrides,
    ]
    readings: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    done = threading.Event()

    def watch() -> None:
        metrics = out / "metrics.jsonl"
        while not done.is_set():
            step = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            if step > args.steps:  # every step logged: what follows is the shutdown, not the run
                break
            sample(readings, step)
            done.wait(args.every)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    rc = train_main(overrides)
    done.set()
    watcher.join()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    faults = rows[-1].get("faults/generator_restarts", 0) if rows else 0
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{len(rows)} steps in {minutes:.1f} min (exit {rc}), generator restarts {faults:g}")
    warm, half = args.steps // 10, args.steps // 2
    print("MB / 100 steps: least-squares slope of RSS after the warm-up, and over the second half alone")
    print(f"{'process':30}{'pid':>8}{'samples':>9}{'RSS start MB':>14}{'RSS end MB':>12}{'slope':>9}{'2nd half':>10}")
    for (label, pid), points in sorted(readings.items()):
        kept = [p for p in points if p[0] >= warm]
        late = [p for p in points if p[0] >= half]
        if len(kept) < 3 or len(late) < 3:
            continue
        print(
            f"{label:30}{pid:>8}{len(kept):>9}{kept[0][1]:>14.0f}{kept[-1][1]:>12.0f}"
            f"{slope_per_100(kept):>9.2f}{slope_per_100(late):>10.2f}"
        )


if __name__ == "__main__":
    main()
