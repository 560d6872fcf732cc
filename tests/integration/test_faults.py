"""Faults during a real training run of the tiny model: processes are killed with SIGKILL, as the OOM killer or a
lost node would, while the job runs in this process (the test's Ray cluster).

- A dead generator actor, and a dead vLLM engine process under a live actor: the job replaces the generator, brings
  it to the current weights, rolls out the lost shard again and carries on; every step is trained and logged once.
  Pipelined, every rollout in flight on the dead generator fails: each is sampled again by the one replacement.
  Killed in the middle of a weight broadcast, it fails the push at once (no collective waits out its timeout), and
  the replacement gets that push's weights before it samples.
- A dead learner rank: the job stops with a message that says how to resume; a resume under a different algorithm
  is refused naming the field; the same command resumes from the last checkpoint and each step is logged once.

On-policy every run here on one learner rank, killed or stopped and resumed, must end where one uninterrupted run of
the same steps ends: the same figures in every step's row and the same final weights, to 1e-5 (the replacement
re-samples the lost shard with the same seeds on the current weights; a resume restores weights, optimizer, sampler
and RNG). That reference run is made once per module. Pipelined runs are not reproducible step for step (a weight push
lands wherever decoding is), nor is the mid-broadcast kill's run on two learner ranks, so there the replacement's
tokens are checked directly: tagged with the current version, and their engine log-probs those of the learner on that
version.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file
from test_train import _args, _assert_resumed_at  # the training test's (tests/integration is on sys.path)

from jobs.train import main as train_main


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


STEPS = 4  # the on-policy fault runs and their uninterrupted reference

# The figures of a step that depend only on what was sampled, graded and trained (not on timing or fault counters).
EXACT = ("reward/", "acc/", "response/", "rollout/", "tool/", "learner/", "staleness/")
# The engine-vs-learner log-prob gap (learner/mismatch_*) on the same weights is fp32 rounding, ~1e-6, that moves with
# the engine's batch composition (the order trajectories reach it): two runs equal in every sampled token differed
# there (5.7e-6 against 9.5e-7 at step 1, before any kill). Its bound is asserted per row (SAME_WEIGHTS_...).
NOT_EXACT = ("time", "per_s", "threads", "mismatch")
# The engine's sampled-token log-probs against the learner's on the same weights, largest |log ratio|: 9.5e-7 here
# (fp32 on CPU); tokens sampled a version or more behind the learner were 0.38 to 4.3 off in the same runs.
SAME_WEIGHTS_MAX_LOG_RATIO = 1e-3


def _fault_args(model_dir: Path, out: Path, save_every: int) -> list[str]:
    return [*_args(model_dir, out, STEPS, 0), "trainer.val_every=0", f"trainer.save_every={save_every}"]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_model_dir, tmp_path_factory) -> Path:
    """The output of the fault runs' job without a fault: what each of them must end up with."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train_main(_fault_args(tiny_model_dir, out, save_every=STEPS)) == 0
    return out


def _assert_same_run(out: Path, reference: Path) -> None:
    """Every step's sampled, graded and trained figures, and the final weights, equal the reference run's to 1e-5.
    A replacement that sampled on other weights or seeds, a resume that lost the optimizer or sampler state, a step
    trained twice or on a partial batch: each changes a row or the weights."""
    rows, ref = {r["step"]: r for r in _rows(out)}, {r["step"]: r for r in _rows(reference)}
    assert sorted(rows) == sorted(ref)
    compared = 0
    for step, want in ref.items():
        for key, value in want.items():
            if key.startswith(EXACT) and not any(part in key for part in NOT_EXACT):
                assert rows[step].get(key) == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
                compared += 1
    assert compared > 20 * STEPS, compared
    final = f"step_{STEPS:06d}/model.safetensors"
    got, want = load_file(out / final), load_file(reference / final)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B offline run file (``run-<id>.wandb``): the records ``wandb sync`` uploads. The file
    is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of records with a 7-byte header: CRC, length,
    type full/first/middle/last), each record a ``wandb_internal_pb2.Record``; wandb 0.31 ships no reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def _generator_groups() -> dict[str, str]:
    """Every generator actor the cluster has had, dead ones too, by actor id: the placement group it was created in
    (hex; empty or nil for none). From GCS's actor table, which keeps it: Ray's state API needs the dashboard, which
    the test cluster does not start."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = state._connect_and_get_accessor().get_actor_table(None, None)
    rows = [gcs_pb2.ActorTableData.FromString(b) for b in table]
    return {r.actor_id.hex(): r.placement_group_id.hex() for r in rows if r.class_name == "Generator"}


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
    """Kill, once step N's row is in metrics.jsonl, what ``plan`` names for it: a generator, its engine, a learner.
    ``victims`` gets the pids of each victim's process tree, to check later that nothing of it survives. A row is
    logged just before its step's checkpoint is saved: kill a learner after a step that is not checkpointed, so that
    the resume point (the checkpoint before) is known."""

    def run() -> None:
        deadline = time.monotonic() + 600
        for step, what in plan:
            while not any(r["step"] == step for r in _rows(out)):
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


def test_dead_generator_and_dead_engine_are_replaced(uninterrupted, tiny_model_dir, tmp_path):
    """The generator is killed as step 1 is logged and its engine process as step 2 is: the rollouts of steps 2 and
    3, under way on them, are lost. Each replacement gets the current weights and re-samples the shard with its
    seeds, so the run is the uninterrupted one, step for step and in its final weights."""
    out = tmp_path / "run"
    killed: list[str] = []
    victims: list[int] = []
    killer = _kill_after(out, [(1, "generator"), (2, "engine")], killed, victims)
    args = [*_fault_args(tiny_model_dir, out, save_every=2), "trainer.max_actor_restarts=2"]
    assert train_main(args) == 0
    killer.join(timeout=5)
    assert killed == ["generator", "engine"]
    _assert_nothing_left(victims)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # each step once, none lost
    assert all(r["rollout/trajectories"] == 16 for r in rows[1:])
    assert rows[-1]["faults/generator_restarts"] == 2
    for r in rows[2:4]:  # re-sampled by a replacement: on the weights the learner then held, and no others
        assert r["rollout/policy_version"] == r["step"] - 1 and r.get("staleness/share_lag_0") == 1, r
        assert r["learner/mismatch_max_abs_log_ratio"] < SAME_WEIGHTS_MAX_LOG_RATIO, r
    _assert_same_run(out, uninterrupted)


@pytest.mark.parametrize("k, route", [(1, "file"), (3, "collective")])
def test_one_generator_death_is_one_replacement_when_pipelined(
    ray_cluster, tiny_model_dir, tmp_path, monkeypatch, k, route
):
    """trainer.max_staleness=k: the generator is killed as the learner starts step 2, while the rollouts of steps
    3..2+k run on it. The push after step 2 meets the death first and replaces the generator; each lost rollout then
    fails when it is collected and is sampled again by that replacement, on the current weights, without replacing
    it again (it used to: k+1 replacements for one death, and at k=3 the default limit of 3 ended the run).
    At k=1 the weights go by ToRL's file route (rollout.weight_sync=file), at k=3 by the collective default."""
    from actors.learner_group import LearnerGroup

    out = tmp_path / "run"
    victims: list[int] = []
    lost_in_flight: list[bool] = []  # at the kill: was the newest rollout ahead still decoding?
    steps: list[int] = []
    train_step = LearnerGroup.train_step

    def kill_generator_then_train(self: LearnerGroup, trajs: list, ahead: list | None = None) -> dict[str, float]:
        steps.append(len(steps) + 1)
        if steps[-1] == 2:
            assert len(ahead or []) == k  # one shard per rollout ahead: a single generator
            lost_in_flight.append(not ray.wait(ahead[-1:], timeout=0, fetch_local=False)[0])
            (victim,) = _actor_processes("Generator")
            victims.extend([victim.pid, *(c.pid for c in victim.children(recursive=True))])
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(timeout=30)
        return train_step(self, trajs, ahead)

    monkeypatch.setattr(LearnerGroup, "train_step", kill_generator_then_train)
    total = 2 + k
    args = [*_args(tiny_model_dir, out, total, k), "trainer.val_every=0", "trainer.val_before_train=false"]
    assert train_main([*args, f"rollout.weight_sync={route}"]) == 0
    assert victims and lost_in_flight == [True]
    _assert_nothing_left(victims)
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, total + 1))  # each step once, none lost
    assert all(r["rollout/trajectories"] == 16 and r["learner/trained_seqs"] == 16 for r in rows)
    assert rows[-1]["faults/generator_restarts"] == 1
    if k == 1:  # the lost rollout, step 3's, re-sampled on v2 and trained on v2: the engine's log-prob of each
        # token is the learner's on the weights the replacement was given (at k=3 the learner has moved on to v4)
        assert rows[2].get("staleness/share_lag_0") == 1, rows[2]
        assert rows[2]["learner/mismatch_max_abs_log_ratio"] < SAME_WEIGHTS_MAX_LOG_RATIO, rows[2]
    # Step 2+k's rollout had started on weights v1 when its generator died. Step 2's checkpoint (save_every=2)
    # finishes the rollouts ahead: the replacement sampled it again there, on v2, so every token is k-1 versions
    # behind the step that trains it, where the lost tokens would have been k behind.
    assert rows[-1][f"staleness/share_lag_{k - 1}"] == 1


def _unread(receiver: psutil.Process, sender: psutil.Process) -> int:
    """Bytes ``sender`` sent ``receiver`` over TCP that it has not read yet (the receive queues of its sockets to
    ``sender``, from /proc/net/tcp*): what a process that is stopped holds of a collective its peer entered."""
    theirs = {c.laddr.port for c in sender.net_connections("tcp")}
    pairs = {
        (c.laddr.port, c.raddr.port) for c in receiver.net_connections("tcp") if c.raddr and c.raddr.port in theirs
    }
    unread = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{receiver.pid}/net/{table}").read_text().splitlines()[1:]:
            local, remote, _state, queues = line.split()[1:5]
            ports = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
            if ports in pairs:
                unread += int(queues.split(":")[1], 16)
    return unread


def test_a_generator_killed_mid_broadcast_is_replaced_once(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    """The generator is SIGKILLed while the push after step 1 broadcasts to it: learner rank 1 is stopped (SIGSTOP)
    before the push, so rank 0 has paused the generator, asked it to receive, and waits inside the broadcast's first
    FSDP gather (its bytes sit unread in rank 1's socket) when the kill lands; then rank 1 continues. The push fails
    on the death, not on rollout.weight_sync_timeout_s; the generator is replaced once; the replacement gets weights
    v1 before it samples step 2 (its tokens carry v1 and their log-probs are the learner's); each step trains once on
    a full batch."""
    from actors.learner_group import LearnerGroup

    out = tmp_path / "run"
    push = LearnerGroup.push_weights
    victims: list[int] = []
    killed_at: list[float] = []
    in_broadcast: list[bool] = []  # at the kill: was rank 0 inside the broadcast's first gather?
    failed_after: list[float] = []  # seconds from the kill until the push gave up

    def kill_mid_broadcast(self: LearnerGroup, version: int) -> dict[str, float]:
        if version != 1 or victims:  # the push of v1 again, to the replacement, goes through
            return push(self, version)
        rank0, rank1 = (
            psutil.Process(p) for p in ray.get([a.__ray_call__.remote(lambda _: os.getpid()) for a in self.actors])
        )
        (victim,) = _actor_processes("Generator")

        def kill() -> None:
            try:
                deadline = time.monotonic() + 120
                while not _unread(rank1, rank0) and time.monotonic() < deadline:
                    time.sleep(0.01)
                in_broadcast.append(_unread(rank1, rank0) > 0)
                victims.extend([victim.pid, *(c.pid for c in victim.children(recursive=True))])
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(timeout=30)
                killed_at.append(time.monotonic())
            finally:
                rank1.resume()

        rank1.suspend()  # idle between steps: its part of the push waits until the kill
        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        try:
            return push(self, version)
        finally:
            killer.join()
            if killed_at:
                failed_after.append(time.monotonic() - killed_at[0])

    monkeypatch.setattr(LearnerGroup, "push_weights", kill_mid_broadcast)
    timeout_s = 120
    earlier = _generator_groups()
    args = [*_args(tiny_model_dir, out, 2, 0), "trainer.val_every=0", "trainer.val_before_train=false"]
    args += ["trainer.save_every=0", "learner.num_workers=2", "data.batch_size=2", "rollout.n=2"]
    assert train_main([*args, f"rollout.weight_sync_timeout_s={timeout_s}"]) == 0
    assert in_broadcast == [True] and len(killed_at) == 1
    assert failed_after[0] < timeout_s / 2, failed_after  # the death ended the push, not the collective timeout
    _assert_nothing_left(victims)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/trajectories"] == 4 and r["learner/trained_seqs"] == 4 for r in rows)
    assert rows[-1]["faults/generator_restarts"] == 1
    # Step 2 sampled by the replacement: every token on v1, the weights the learner held, and no others.
    assert rows[1]["rollout/policy_version"] == 1 and rows[1].get("staleness/share_lag_0") == 1, rows[1]
    assert rows[1]["learner/mismatch_max_abs_log_ratio"] < SAME_WEIGHTS_MAX_LOG_RATIO, rows[1]
    # The generator and its replacement in the one bundle of the run's placement group for generators, packed, and
    # the group released when the run ended (jobs/run.py generator_placement).
    groups = {actor: group for actor, group in _generator_groups().items() if actor not in earlier}
    assert len(groups) == 2 and len(set(groups.values())) == 1, groups
    tables = ray.util.placement_group_table()
    assert set(groups.values()) <= tables.keys(), groups
    table = tables[next(iter(groups.values()))]
    assert table["strategy"] == "PACK" and table["bundles"] == {0: {"CPU": 1.0}}, table
    assert table["state"] == "REMOVED", table


def test_the_run_stops_once_max_actor_restarts_are_spent(ray_cluster, tiny_model_dir, tmp_path):
    """trainer.max_actor_restarts=0: the first generator death stops the run, naming the bound and the cause, instead
    of replacing it; nothing of the run is left."""
    out = tmp_path / "run"
    killed: list[str] = []
    victims: list[int] = []
    killer = _kill_after(out, [(1, "generator")], killed, victims)
    args = [*_args(tiny_model_dir, out, 2, 0), "trainer.val_every=0", "trainer.val_before_train=false"]
    stopped = r"generator 0 died and 0 generator\(s\) were already replaced .*max_actor_restarts=0.*Last cause"
    with pytest.raises(RuntimeError, match=stopped):
        train_main([*args, "trainer.save_every=0", "trainer.max_actor_restarts=0"])
    killer.join(timeout=5)
    assert killed == ["generator"]
    _assert_nothing_left(victims)
    assert [r["step"] for r in _rows(out)] == [1]  # step 2 was never trained on a partial or re-sampled batch


def test_dead_learner_stops_the_run_and_the_same_command_resumes(uninterrupted, tiny_model_dir, tmp_path, capsys):
    """The learner is killed once step 3 is logged (checkpoints every 2 steps): the run stops, and the same command
    resumes from step 2's checkpoint, redoes step 3 and ends as the uninterrupted run. W&B (offline) records both
    parts under one run id, each row at its training step, so the redone step's first record is the one W&B keeps."""
    out = tmp_path / "run"
    args = [*_fault_args(tiny_model_dir, out, save_every=2), "wandb.mode=offline"]
    killed: list[str] = []
    victims: list[int] = []
    killer = _kill_after(out, [(3, "learner")], killed, victims)
    assert train_main(args) == 1
    killer.join(timeout=5)
    _assert_nothing_left(victims)
    err = capsys.readouterr().err
    assert "learner rank 0 died" in err and "run the same command again to resume from" in err
    assert "step_000002" in err
    first = _rows(out)
    assert [r["step"] for r in first] == [0, 1, 2, 3]  # step 3 logged, not checkpointed: it is redone

    # A different algorithm is another run: refused, naming the field, before the data is read or any actor starts.
    assert train_main([*args, "algo.clip_high=0.28"]) == 2
    refused = capsys.readouterr()
    assert "algo.clip_high: checkpoint 0.2, now 0.28" in refused.err
    assert "training prompts" not in refused.out  # printed once the data is read, before Ray and the actors start

    assert train_main(args) == 0
    _assert_resumed_at(capsys.readouterr().out, out / "step_000002", 2, first, _rows(out))
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3, 4]  # step 3 logged once (the redone one's row)
    _assert_nothing_left([])
    _assert_same_run(out, uninterrupted)

    parts = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    run_id = (out / "wandb_run_id").read_text().strip()
    assert [p.name for p in parts] == [f"run-{run_id}.wandb"] * 2, parts  # the killed run, then the resumed one
    logged = [_wandb_history(part) for part in parts]
    assert [r["step"] for r in logged[0]] == [0, 1, 2, 3] and [r["step"] for r in logged[1]] == [3, 4]
    assert all(r["_step"] == r["step"] for part in logged for r in part)  # W&B's step is the training step
    # The first record of step 3 is the killed run's row, as it was logged (metrics.jsonl keeps the redone one).
    assert logged[0][3]["reward/mean"] == first[3]["reward/mean"]


def test_sigterm_stops_the_job_cleanly_and_the_next_start_resumes(uninterrupted, tiny_model_dir, tmp_path, capsys):
    """What `ray job stop` does: SIGTERM to the driver, here while it saves a checkpoint every step. The job exits
    130 after shutting its actors down; no temporary or marker-less checkpoint is left that a resume could pick,
    and the next start continues from the last complete one. Its own Ray instance, as a submitted job has."""
    import subprocess
    import sys

    from torl.infra.checkpoint import MARKER, latest_checkpoint

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    args = _fault_args(tiny_model_dir, out, save_every=1)
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
    first = _rows(out)

    assert train_main(args) == 0
    _assert_resumed_at(capsys.readouterr().out, last, done, first, _rows(out))
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3, 4]
    assert done >= 1
    _assert_same_run(out, uninterrupted)
