"""Training step time by phase: on-policy with one learner thread, on-policy, pipelined; and generator idle time.

    python bench/train.py [key=value ...]      # overrides apply to every run (default: the tiny CPU preset)

Runs the same short training five times in one process on one Ray cluster: trainer.max_staleness=0 (ToRL's
strictly on-policy order) with the learner held to one torch thread (learner.num_threads=1, the earlier CPU
default), the same with learner.num_threads=0 (auto: on-policy the learner gets every core, since nothing else
computes while it trains), and max_staleness=1, 2, 4 (rollouts of up to k later steps overlap training of step t).
Prints per-phase seconds per step, step-time ratios, the share of wall time the generators had no rollout to work
on, and what recomputing the old log-probs costs.
Figures are ratios from the same run; the first step of each run (engine warm-up) is left out.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.train import main as train_main  # noqa: E402

PHASES = [
    "time/step",
    "time/wait_rollout",
    "time/rollout",
    "time/grade",
    "time/train",
    "time/sync",
    "time/tool_wait",
    "time/generate",
    "learner/time_old_logprobs",
]


def run(name: str, variant: list[str], out: Path, overrides: list[str]) -> list[dict]:
    args = [
        f"trainer.output_dir={out}",
        "trainer.val_before_train=false",
        "trainer.val_every=0",
        "trainer.save_every=0",
        "wandb.mode=disabled",
        "trainer.resume=never",
        "trainer.total_steps=6",
        *variant,
        *overrides,
    ]
    if train_main(args) != 0:
        raise SystemExit(f"training run {name!r} failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] >= 2]  # step 1 includes engine warm-up


def summarise(rows: list[dict]) -> dict[str, float]:
    out = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in PHASES}
    total = sum(r["time/step"] for r in rows)
    # With staleness 0 the engine idles while grading/training/syncing; time/rollout is its busy span per step.
    out["generator_idle_share"] = max(0.0, 1.0 - sum(r.get("time/rollout", 0.0) for r in rows) / total)
    return out


VARIANTS = {
    "1 thread": ["trainer.max_staleness=0", "learner.num_threads=1"],
    "on-policy": ["trainer.max_staleness=0"],
    "pipelined": ["trainer.max_staleness=1"],
    "k=2": ["trainer.max_staleness=2"],
    "k=4": ["trainer.max_staleness=4"],
}


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: summarise(run(name, variant, Path(tmp) / f"run{i}", argv))
            for i, (name, variant) in enumerate(VARIANTS.items())
        }
    print(f"{'phase (s/step)':<24}" + "".join(f"{name:>12}" for name in results))
    for key in [*PHASES, "generator_idle_share"]:
        print(f"{key:<24}" + "".join(f"{r[key]:>12.3f}" for r in results.values()))
    base = results["1 thread"]["time/step"]
    for name in ("on-policy", "pipelined"):
        print(f"{name} / on-policy with 1 learner thread, step time: {results[name]['time/step'] / base:.2f}x")
    k0 = results["on-policy"]["time/step"]
    for name, k in (("pipelined", 1), ("k=2", 2), ("k=4", 4)):
        print(f"max_staleness={k} / max_staleness=0, step time: {results[name]['time/step'] / k0:.2f}x")
    print(
        "old log-probs recompute / learner step, on-policy: "
        f"{results['on-policy']['learner/time_old_logprobs'] / results['on-policy']['time/train']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
