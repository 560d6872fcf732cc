"""Training step time by phase, pipelined vs on-policy, and how long the generators sit idle.

    python bench/train.py [key=value ...]      # overrides apply to both runs (default: the tiny CPU preset)

Runs the same short training twice in one process on one Ray cluster, with trainer.max_staleness=0 (ToRL's
strictly on-policy order) and 1 (rollout of step t+1 overlaps training of step t), and prints per-phase seconds
per step, the step-time ratio, and the share of wall time the generators had no rollout to work on.
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
]


def run(staleness: int, out: Path, overrides: list[str]) -> list[dict]:
    args = [
        f"trainer.max_staleness={staleness}",
        f"trainer.output_dir={out}",
        "trainer.val_before_train=false",
        "trainer.val_every=0",
        "trainer.save_every=0",
        "wandb.mode=disabled",
        "trainer.resume=never",
        "trainer.total_steps=6",
        *overrides,
    ]
    if train_main(args) != 0:
        raise SystemExit(f"training run with max_staleness={staleness} failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] >= 2]  # step 1 includes engine warm-up


def summarise(rows: list[dict]) -> dict[str, float]:
    out = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in PHASES}
    total = sum(r["time/step"] for r in rows)
    # With staleness 0 the engine idles while grading/training/syncing; time/rollout is its busy span per step.
    out["generator_idle_share"] = max(0.0, 1.0 - sum(r.get("time/rollout", 0.0) for r in rows) / total)
    return out


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: summarise(run(s, Path(tmp) / f"staleness{s}", argv)) for s in (0, 1)}
    print(f"{'phase (s/step)':<24}{'on-policy':>12}{'pipelined':>12}")
    for key in [*PHASES, "generator_idle_share"]:
        print(f"{key:<24}{results[0][key]:>12.3f}{results[1][key]:>12.3f}")
    ratio = results[1]["time/step"] / results[0]["time/step"]
    print(f"\npipelined / on-policy step time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
