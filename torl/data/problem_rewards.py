"""Each training problem's reward every time it is sampled: the raw material of LIMR selection.

LIMR (Li et al. 2025, "LIMR: Less is More for RL Scaling") keeps the problems whose reward curve over training follows
the run's average learning curve (``torl/prepare/limr.py``); the trainer only has to write the curves down. One JSON
line per problem per training step in ``<run dir>/problem_rewards.jsonl``: step, problem id, samples, correct, mean
reward.

Resumable: a resumed run repeats the steps after its checkpoint, so a write for a step at or below the last step
already in the file first drops the lines from that step on (the file then reads as one uninterrupted run), and a
torn last line left by a killed write is cut off. Each step is one append, flushed and synced, and the check reads
only the file's tail, so the cost per step does not grow with the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from torl.data.problems import DataError
from torl.rollout.types import Trajectory

FILE_NAME = "problem_rewards.jsonl"
_TAIL_BYTES = 65536  # far more than one line


@dataclass(frozen=True)
class ProblemReward:
    step: int
    problem_id: str
    samples: int
    correct: int
    reward: float  # mean reward of the samples (torl's +1/-1 scale, shaping included)

    @property
    def accuracy(self) -> float:
        """Share of correct samples: the reward on LIMR's [0, 1] scale."""
        return self.correct / self.samples


def step_records(step: int, trajs: Iterable[Trajectory]) -> list[ProblemReward]:
    """One record per problem of a graded batch, in first-seen order."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajs:
        groups.setdefault(t.problem_id, []).append(t)
    return [
        ProblemReward(step, pid, len(ts), sum(bool(t.correct) for t in ts), sum(t.reward for t in ts) / len(ts))
        for pid, ts in groups.items()
    ]


def record_problem_rewards(run_dir: str | Path, step: int, trajs: Iterable[Trajectory]) -> None:
    """Append this step's per-problem rewards to ``<run_dir>/problem_rewards.jsonl`` (resume-safe, see above)."""
    path = Path(run_dir) / FILE_NAME
    _drop_from_step(path, step)
    text = "".join(json.dumps(asdict(r)) + "\n" for r in step_records(step, trajs))
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _drop_from_step(path: Path, step: int) -> None:
    """Cut a torn last line, and every line of ``step`` or later (a resumed run is about to write them again)."""
    if not path.exists():
        return
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    complete = tail.rfind(b"\n") + 1  # 0 when the tail holds no complete line
    if complete < len(tail):
        with open(path, "r+b") as f:
            f.truncate(size - (len(tail) - complete))
    last = tail[:complete].rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if not last or json.loads(last)["step"] < step:
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(True) if json.loads(line)["step"] < step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def load_problem_rewards(path: str | Path) -> list[ProblemReward]:
    """Records from a ``problem_rewards.jsonl`` or the run directory holding it; a torn last line is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise DataError(f"{path}: no per-problem reward file (a training run writes {FILE_NAME} in its directory)")
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")[:-1] if not raw.endswith("\n") else raw.split("\n")  # the torn tail is dropped
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(ProblemReward(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataError(f"{path}:{lineno}: not a per-problem reward record ({exc})") from exc
    return records


def reward_curves(records: Iterable[ProblemReward]) -> dict[str, list[float]]:
    """Each problem's accuracy every time it was sampled, in step order: its LIMR reward curve."""
    by_problem: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        by_problem.setdefault(r.problem_id, []).append((r.step, r.accuracy))
    return {pid: [acc for _, acc in sorted(points)] for pid, points in by_problem.items()}
