"""Plot a run's learning curves from its metrics.jsonl into a PNG.

    python jobs/plot_run.py runs/tiny_cpu [--out curves.png]

Panels: validation accuracy (greedy, held out), training reward and accuracy, code ratio and execution success,
response length, and step time by phase. Reads only metrics.jsonl, so it works with W&B off or offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("held-out accuracy (greedy)", ["val/acc/mean", "val/tool/code_ratio"]),
    ("training batch", ["acc/mean", "reward/mean"]),
    ("tool use (training)", ["tool/code_ratio", "tool/exec_success", "acc/with_code", "acc/without_code"]),
    ("response length (tokens)", ["response/length_mean"]),
    ("seconds per step", ["time/step", "time/wait_rollout", "time/train", "time/grade", "time/sync"]),
]


def load(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"no metrics.jsonl in {run_dir}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A resumed run appends; keep the last record logged for each step.
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def plot(rows: list[dict], out: Path, title: str) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (name, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if key.startswith("val/") else None, ms=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "curves.png"
    plot(load(args.run_dir), out, str(args.run_dir))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
