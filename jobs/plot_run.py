"""Plot a run's learning curves from its metrics.jsonl into a PNG.

    python jobs/plot_run.py runs/tiny_cpu [--out curves.png] [--compare runs/other ...]

Panels: validation accuracy (greedy, held out), training reward and accuracy, code ratio and execution success,
error recovery (accuracy after a failed first call, held-out and training; retries; effective code), the code ratio
by difficulty level (training, and held-out sampled with ``trainer.val_samples``), response length,
and step time by phase. ``--compare`` draws further runs into the same panels, dashed (e.g. a C=1 control beside
C=2). Reads only metrics.jsonl, so it works with W&B off or offline.
"""

from __future__ import annotations

import argparse
import fnmatch
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
    # docs/metrics.md: accuracy after a failed first call, retries, answers read off a successful output
    (
        "error recovery",
        [
            "val/tool/acc_first_failed",
            "tool/acc_first_failed",
            "val/tool/retry_after_fail",
            "val/tool/effective_code_ratio",
        ],
    ),
    # selective tool use (docs/selective.md): the code ratio per difficulty level, training and held-out sampled
    ("code ratio by level", ["level/*/code_ratio", "val_sampled/level/*/code_ratio"]),
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


def plot(rows: list[dict], out: Path, title: str, compare: dict[str, list[dict]] | None = None) -> None:
    """One panel per ``PANELS`` entry; the runs of ``compare`` (name -> rows) dashed, in the same colour per key."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    runs = [rows, *(compare or {}).values()]
    for ax, (name, patterns) in zip(axes, PANELS, strict=True):
        for i, key in enumerate(_expand(patterns, runs)):
            marker = "o" if key.startswith("val") else None
            for run, style in zip(runs, ["-"] + ["--"] * (len(runs) - 1), strict=True):
                pts = [(r["step"], r[key]) for r in run if key in r]
                if pts:
                    label = key if style == "-" else f"{key} ({_name_of(run, compare)})"
                    ax.plot(*zip(*pts, strict=True), style, color=f"C{i}", marker=marker, ms=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _expand(patterns: list[str], runs: list[list[dict]]) -> list[str]:
    """The panel's keys: a pattern with ``*`` stands for every logged key it matches (one per difficulty level)."""
    logged = sorted({k for run in runs for r in run for k in r})
    return [k for p in patterns for k in ([p] if "*" not in p else fnmatch.filter(logged, p))]


def _name_of(rows: list[dict], compare: dict[str, list[dict]] | None) -> str:
    return next(name for name, r in (compare or {}).items() if r is rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="further run dirs, drawn dashed")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "curves.png"
    compare = {str(d): load(d) for d in args.compare}
    title = " vs ".join([str(args.run_dir), *compare]) + (" (dashed)" if compare else "")
    plot(load(args.run_dir), out, title, compare)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
