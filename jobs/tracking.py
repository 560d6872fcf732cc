"""Driver-side run tracking: W&B (offline unless the user is logged in), a metrics.jsonl file, a console line.

Only driver processes (jobs/) log; actors return flat slash-namespaced metric dicts. ``metrics.jsonl`` is always
written so curves can be plotted without W&B (jobs/plot_run.py). Not here: computing metrics (torl/rollout/metrics.py).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from torl.config import WandbConfig
from torl.rollout.types import Trajectory

SAMPLE_COLUMNS = ["step", "id", "response", "gold", "reward", "calls", "status"]


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class Tracker:
    """One run's sinks. ``log`` never raises for a W&B problem: a tracking failure must not end a long run."""

    def __init__(self, cfg: WandbConfig, output_dir: str, config: dict[str, Any], job: str = "train") -> None:
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in finish)
        self.run = None
        mode = cfg.mode
        if mode == "auto":
            mode = "online" if _wandb_logged_in() else "offline"
        self.mode = mode
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity or None,
                name=cfg.name or self.out.name,
                dir=cfg.dir or str(self.out),
                mode=mode,
                config=config,
                job_type=job,
                resume="allow",
                id=self._run_id(),
                settings=wandb.Settings(silent=True),  # its banner is replaced by the one line below
            )
            # Dashboard sections: W&B groups panels by the prefix before the first slash.
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
            print(f"[torl] W&B {mode} run: {self.run.dir}")

    def _run_id(self) -> str:
        """A stable id per output dir, so a resumed run appends to the same W&B run."""
        path = self.out / "wandb_run_id"
        if path.exists():
            return path.read_text().strip()
        rid = uuid.uuid4().hex[:12]
        path.write_text(rid)
        return rid

    def keep_steps_before(self, step: int) -> None:
        """Drop the local rows (metrics.jsonl, samples.jsonl) of ``step`` and later: a resumed run redoes those
        steps, and each step is to appear once. Rewritten atomically, so a crash here loses nothing kept."""
        self.jsonl.close()
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.out / name
            if not path.is_file():
                continue
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] < step]
            if len(kept) == len(lines):
                continue
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            print(f"[torl] {name}: dropped {len(lines) - len(kept)} rows of steps >= {step} (they are redone)")
        self.jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in finish)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.run is not None:
            try:
                # W&B's own step is the training step: a resumed run (same run id) that redoes a step logs it at a
                # step W&B already has, so the first record is kept and the second ignored with a warning; with W&B
                # counting its calls instead, both were kept, one of them after the steps that followed it.
                self.run.log({"step": step, **clean}, step=step)
            except Exception as exc:  # noqa: BLE001 - tracking must never end the run
                print(f"[torl] W&B log failed at step {step}: {exc}")

    def log_samples(self, step: int, trajs: list[Trajectory], limit: int = 16) -> None:
        """A table of sampled trajectories with their code and tool outputs."""
        rows = [
            [
                step,
                t.problem_id,
                t.text,
                t.answer,
                t.reward,
                len(t.tool_calls),
                "|".join(c.status for c in t.tool_calls),
            ]
            for t in trajs[:limit]
        ]
        with open(self.out / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(dict(zip(SAMPLE_COLUMNS, r, strict=True))) + "\n")
        if self.run is not None:
            import wandb

            table = wandb.Table(columns=SAMPLE_COLUMNS, data=rows)
            self.run.log({"step": step, "samples/trajectories": table}, step=step)  # one W&B row per step

    @staticmethod
    def figures(metrics: dict[str, float], spec: list[tuple[str, str, str]]) -> dict[str, str]:
        """``{label: formatted value}`` for each (metric, label, format) of ``spec`` present in ``metrics``."""
        return {label: fmt.format(metrics[key]) for key, label, fmt in spec if key in metrics}

    @classmethod
    def summary(cls, metrics: dict[str, float], spec: list[tuple[str, str, str]]) -> str:
        return ", ".join(f"{label} {value}" for label, value in cls.figures(metrics, spec).items())

    def wandb_location(self) -> str:
        """Where the user finds this run in W&B: its URL online, the sync command offline, or why there is none."""
        if self.run is None:
            return "off (wandb.mode=disabled)"
        if self.mode == "offline":
            return f"offline, in {self._offline_parts()}"
        return getattr(self.run, "url", None) or str(self.run.dir)

    def finish(self) -> None:
        self.jsonl.close()
        if self.run is not None:
            self.run.finish()
            if self.mode == "offline":
                print(f"[torl] W&B offline run saved; upload with: wandb sync {self._offline_parts()}")

    def _offline_parts(self) -> str:
        """The offline directories of this run, as a glob: a resumed run adds one per start, under the same run id,
        and ``wandb sync`` given them all uploads them in order of start time into that one run."""
        return str(Path(self.run.dir).parents[1] / f"offline-run-*-{self.run.id}*")
