"""Every bench/ script runs at a seconds-to-minutes size and prints its figures, so a benchmark cannot rot unseen.

bench/rollout.py crashed after five minutes of measuring (KeyError 'tool/exec_success' on its tools-off row) because
nothing ran it after the metrics changed (#32). Each test here runs one script as a user would, in a process of its
own (each starts its own local Ray cluster, as the scripts do), with the smallest arguments that still take the
script's code path to its printed figures (SMOKE), and checks those figures are there and sane. The scripts run two at
a time (the ``smoke`` fixture), as each leaves much of the machine idle while it starts. Where a script compares
variants that each start their own actors (training orders, weight-sync routes, learner groups), the smoke run
measures one: a variant costs an engine or learner start (10-25 s here), while the comparison is a division.
bench/gpu_smoke.py has its own test (tests/unit/test_gpu_smoke.py). The sizes measure nothing: the figures of record
come from the default arguments (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# The tiny CPU default, as small as a run gets: two steps of two prompts, short responses, no validation.
TINY_TRAINING = [
    "trainer.total_steps=2",
    "data.batch_size=2",
    "rollout.n=2",
    "rollout.max_response_tokens=24",
    "trainer.val_before_train=false",
    "sandbox.num_workers=1",
    "wandb.mode=disabled",
]


def bench(script: str, *args: str, timeout: float = 240, python: str = sys.executable) -> str:
    """Run ``bench/<script>`` with ``args``; its stdout (stderr's tail in the failure message)."""
    cmd = [python, str(REPO / "bench" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


# Each script's smoke run: its smallest arguments that still reach the printed figures ({port}: a free port, {model}:
# the tiny test model), the longest run first.
SMOKE = {
    "serve": ["--requests", "8", "--max-tokens", "8", "--clients", "1", "--port", "{port}"],
    "rollout": [
        *("--prompts", "8", "--response-tokens", "48", "--timeout", "2", "--warm-steps", "20"),
        *("--heavy", "0.125", "--hang", "0", "--call-p", "0.2", "--slots", "2", "--sandbox-workers", "1"),
    ],
    "train": ["--variants=on-policy", *TINY_TRAINING],
    "soak": ["--steps", "2", "--every", "0.5", *TINY_TRAINING],
    "weight_sync": ["--models", "tiny", "--generators", "1", "--pushes", "1", "--routes", "collective"],
    "learner": [
        *("--hidden", "64", "--layers", "1", "--seqs", "4", "--prompt-len", "8", "--resp-len", "32"),
        *("--budget", "256", "--steps", "1", "--workers", "2"),
    ],
    "logprobs_memory": ["--model", "{model}", "--tokens", "2048", "--chunks", "0", "256"],
    "sandbox": [
        *("--workers", "1", "--per-worker", "2", "--n", "8", "--n-fresh", "2", "--callers", "1"),
        *("--isolation", "best", "--timeout", "1"),
    ],
    "correction": ["--seqs", "16", "--tokens", "64"],
}
# Two scripts at a time: one script's start-up (imports, process spawns, Ray's and vLLM's start) leaves this 2-core
# machine about 45 % idle (vmstat over bench/train.py's smoke run), so two overlap without slowing each other much.
PAIRED = 2


@pytest.fixture(scope="module")
def smoke(request):
    """Script name -> a call that waits for its smoke run's stdout. Starts, PAIRED at a time, the runs of the tests
    selected in this session only (``-k train`` runs bench/train.py alone); each test is named test_<script>_..."""
    names = {item.name for item in request.session.items if item.path == Path(__file__)}
    wanted = [script for script in SMOKE if any(name.startswith(f"test_{script}_") for name in names)]
    model = str(request.getfixturevalue("tiny_model_dir")) if "logprobs_memory" in wanted else ""
    pool = ThreadPoolExecutor(PAIRED)
    runs = {
        script: pool.submit(bench, f"{script}.py", *(a.format(port=free_port(), model=model) for a in SMOKE[script]))
        for script in wanted
    }
    yield lambda script: runs[script].result()
    pool.shutdown(cancel_futures=True)


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text, re.M)
    assert found, f"{pattern!r} not in the output:\n{text[-3000:]}"
    return float(found.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rollout_prints_every_run_and_the_three_ratios(smoke):
    """The tools-off row has no executed calls (no tool/exec_success): it prints '-' there, not a KeyError."""
    out = smoke("rollout")
    rows = {m.group(1): m.group(0).split() for m in re.finditer(r"^(tools-off|async|sync)\s+\d.*$", out, re.M)}
    assert set(rows) == {"tools-off", "async", "sync"}, out
    assert rows["tools-off"][4:6] == ["0", "-"]  # no calls, so no success rate
    assert all(float(rows[r][2]) > 0 for r in rows)  # sampled tokens
    for figure in ("tool overhead, async wall / tools-off wall", "sync wall / async wall", "tool-loop tokens/s"):
        assert number(re.escape(figure) + r"[^:]*: ([\d.]+)", out) > 0


def test_learner_prints_the_plain_loop_and_the_fsdp_group(smoke):
    out = smoke("learner")
    assert number(r"plain PyTorch, 1 process, 2 threads: ([\d.]+) s/step", out) > 0
    assert number(r"learner group, 2 worker\(s\) x 1 CPU: ([\d.]+) s/step", out) > 0  # FSDP2 over gloo


def test_logprobs_memory_prints_both_variants_and_their_ratio(smoke):
    out = smoke("logprobs_memory")
    full = re.search(r"^\s+full\s+(-?\d+)\s+([\d.]+)\s+(\S+)$", out, re.M)
    chunked = re.search(r"^\s+256\s+(-?\d+)\s+([\d.]+)\s+(\S+)$", out, re.M)
    assert full and chunked, out
    assert float(full.group(3)) == pytest.approx(float(chunked.group(3)), rel=1e-4)  # the same loss either way
    assert number(r"peak ratio full / chunk 256: ([\d.]+)x", out) > 0


def test_correction_prints_both_passes_and_the_speed_up(smoke):
    out = smoke("correction")
    for line in ("per-token Python pass", "tensor pass from lists", "tensor pass on tensors"):
        assert number(re.escape(line) + r"\s+([\d.]+) s", out) >= 0
    assert number(r"speed-up: ([\d.]+)x from lists", out) > 0


def test_sandbox_prints_pool_and_fresh_process_rates(smoke):
    out = smoke("sandbox")
    rows = re.findall(r"^best:\S+\s+(print\(1\)|sympy|mix)\s+1 \|\s+([\d.]+) .*\|\s+([\d.]+)x", out, re.M)
    assert [r[0] for r in rows] == ["print(1)", "sympy", "mix"], out
    assert all(float(rate) > 0 and float(ratio) > 0 for _, rate, ratio in rows)


def test_serve_prints_bare_and_serve_rates_with_the_same_tokens(smoke):
    out = smoke("serve")
    row = re.search(r"^\s+1 \|\s+([\d.]+) .*\|\s+([\d.]+) .*\| ([\d.]+)x(.*)$", out, re.M)
    assert row, out
    assert float(row.group(1)) > 0 and float(row.group(2)) > 0 and "differ" not in row.group(4)
    assert number(r"Serve overhead at 1 clients: ([\d.]+)x", out) > 0


def test_soak_trains_and_reports_its_steps(smoke):
    out = smoke("soak")
    assert re.search(r"^2 steps in [\d.]+ min \(exit 0\), generator restarts 0$", out, re.M), out
    assert "MB / 100 steps" in out


def test_train_prints_the_phases_of_a_variant(smoke):
    out = smoke("train")
    assert re.search(r"^phase \(s/step\)\s+on-policy$", out, re.M), out
    assert number(r"^time/step median\s+(\S+)$", out) > 0
    assert number(r"^time/train\s+(\S+)$", out) > 0
    assert number(r"^old log-probs recompute / learner step, on-policy: ([\d.]+)$", out) >= 0


def test_weight_sync_prints_the_collective_route(smoke):
    out = smoke("weight_sync")
    assert re.search(r"^\s+collective$", out, re.M), out
    assert number(r"^seconds per push\s+([\d.]+)$", out) > 0
    for proc in ("learner rank 0", "generator 0", "generator 0 engine"):
        assert number(rf"^peak RSS {proc}\s+(\d+) MB \(\+\s*-?\d+\)$", out) > 0


TRL_PYTHON = REPO / ".venv-trl" / "bin" / "python"


@pytest.mark.skipif(not TRL_PYTHON.exists(), reason=f"needs {TRL_PYTHON} (made as bench/trl_grpo.py says)")
def test_trl_grpo_prints_its_json_line():
    import json

    out = bench("trl_grpo.py", "--tools", *TINY_TRAINING, python=str(TRL_PYTHON))
    result = json.loads(out.strip().splitlines()[-1])
    assert result["s_per_step_median"] > 0
