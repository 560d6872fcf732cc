"""Faults during a real training run of the tiny model: processes are killed with SIGKILL, as the OOM killer or a
lost node would, while the job runs in this process (the test's Ray cluster).

- A dead generator actor, and a dead vLLM engine process under a live actor: the job replaces the generator, brings
  it to the current weights, rolls out the lost shard again and carries on; every step is trained and logged once.
- A dead learner rank: the job stops with a message that says how to resume; a resume under a different algorithm
  is refused naming the field; the same command resumes from the last checkpoint and each step is logged once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
from test_train import _args  # the training test's arguments (tests/integration is on sys.path)

from jobs.train import main as train_main


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _actor_processes(kind: str) -> list[psutil.Process]:
    """This test cluster's worker processes running actors of class ``kind`` (Ray titles them ``ray::<Class>...``).
    Only descendants of this process, which started the cluster: other Ray clusters on the machine are not ours."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(f"ray::{kind}"):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


# What a training run starts: actor processes and what they start (engine cores, sandbox zygotes).
RUN_PROCESSES = (
    "ray::Generator",
    "ray::Learner",
    "ray::SandboxWorker",
    "ray::Grader",
    "EngineCore",
    "torl.sandbox.zygote",
)


def _run_processes() -> list[psutil.Process]:
    """This test cluster's processes of a training run (descendants of this process only)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        if any(p in cmd for p in RUN_PROCESSES) and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _assert_nothing_left(victims: list[int], timeout_s: float = 60) -> None:
    """After the run: no process of it is left, in particular nothing under an actor that was killed (an engine core
    or a zygote orphaned by its dead parent would no longer be our descendant, so the victims are checked by pid)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in victims if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        rest = _run_processes()
        if not left and not rest:
            return
        time.sleep(0.5)
    raise AssertionError(f"left running: victims {left}, run processes {[' '.join(p.cmdline())[:80] for p in rest]}")


def _engine_of(generator: psutil.Process) -> psutil.Process:
    engines = [c for c in generator.children(recursive=True) if "EngineCore" in " ".join(c.cmdline())]
    assert engines, "the generator has no engine-core process"
    return engines[0]


def _kill_after(
    out: Path, plan: list[tuple[int, str]], done: list[str], victims: list[int] | None = None
) -> threading.Thread:
    """Kill, once step N's row is in metrics.jsonl, what ``plan`` names for it: a generator, its engine, a learner
    (that one once step N's checkpoint is complete, so the resume point is known). ``victims`` gets the pids of
    each victim's process tree, to check later that nothing of it survives."""

    def run() -> None:
        deadline = time.monotonic() + 600
        for step, what in plan:
            # The learner dies once step N is also checkpointed (the row is logged just before the save).
            saved = out / f"step_{step:06d}" / "COMPLETE"
            while not any(r["step"] == step for r in _rows(out)) or (what == "learner" and not saved.is_file()):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            kind = "Learner" if what == "learner" else "Generator"
            victim = _actor_processes(kind)[0]
            if what == "engine":
                victim = _engine_of(victim)
            if victims is not None:
                victims.extend([victim.pid, *(c.pid for c in victim.children(recursive=True))])
            os.kill(victim.pid, signal.SIGKILL)
            done.append(what)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_dead_generator_and_dead_engine_are_replaced(ray_cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    killed: list[str] = []
    victims: list[int] = []
    killer = _kill_after(out, [(1, "generator"), (2, "engine")], killed, victims)
    args = [*_args(tiny_model_dir, out, 4, 0), "trainer.val_every=0", "trainer.max_actor_restarts=2"]
    assert train_main(args) == 0
    killer.join(timeout=5)
    assert killed == ["generator", "engine"]
    _assert_nothing_left(victims)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # each step once, none lost
    assert all(r["rollout/trajectories"] == 16 for r in rows[1:])
    assert rows[-1]["faults/generator_restarts"] == 2
    assert rows[-1]["rollout/policy_version"] == 3  # the replacement samples on the current weights


def test_dead_learner_stops_the_run_and_the_same_command_resumes(ray_cluster, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*_args(tiny_model_dir, out, 3, 0), "trainer.val_every=0", "trainer.save_every=1"]
    killed: list[str] = []
    victims: list[int] = []
    killer = _kill_after(out, [(2, "learner")], killed, victims)
    assert train_main(args) == 1
    killer.join(timeout=5)
    _assert_nothing_left(victims)
    err = capsys.readouterr().err
    assert "learner rank 0 died" in err and "run the same command again to resume from" in err
    assert "step_000002" in err

    # A different algorithm is another run: refused, naming the field, before anything is loaded.
    assert train_main([*args, "algo.clip_high=0.28"]) == 2
    assert "algo.clip_high: checkpoint 0.2, now 0.28" in capsys.readouterr().err

    assert train_main(args) == 0
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3]  # step 3 (cut short by the kill) logged once
    _assert_nothing_left([])


def test_sigterm_stops_the_job_cleanly_and_the_next_start_resumes(tiny_model_dir, tmp_path):
    """What `ray job stop` does: SIGTERM to the driver, here while it saves a checkpoint every step. The job exits
    130 after shutting its actors down; no temporary or marker-less checkpoint is left that a resume could pick,
    and the next start continues from the last complete one. Its own Ray instance, as a submitted job has."""
    import subprocess
    import sys

    from torl.checkpoint import MARKER, latest_checkpoint

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    args = [*_args(tiny_model_dir, out, 4, 0), "trainer.val_every=0", "trainer.save_every=1"]
    env = {**os.environ, "TORL_PROGRESS": "lines"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "jobs/train.py", *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not any(r["step"] == 1 for r in _rows(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    while not list(out.glob(".step_*")) and time.monotonic() < deadline:  # step 2's save under way, if caught
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    job_tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]  # its Ray, actors, engines
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, output[-3000:]
    _assert_nothing_left(job_tree)  # the stopped job's Ray instance and everything under it are gone
    assert "interrupted; the last complete checkpoint is kept" in output
    assert not list(out.glob(".step_*")), "a temporary checkpoint directory was left behind"
    assert all((d / MARKER).is_file() for d in out.glob("step_*"))
    last = latest_checkpoint(out)
    assert last is not None
    done = json.loads((last / "trainer_state.json").read_text())["step"]

    assert train_main(args) == 0
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3, 4]
    assert done >= 1
