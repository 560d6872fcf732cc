"""bench/gpu_smoke.py's tiny CPU version runs (seconds): the learner's model (FSDP2, fp32 master weights and AdamW
states, bf16 compute), its figures, a finite loss, and a failing exit when a check does not hold. The GPU-only
checks (peak memory within the preflight's estimate, the MFU floor) share the failure path the MFU case drives."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = [sys.executable, "bench/gpu_smoke.py", "--tiny", "--device", "cpu", "--peak-tflops", "1"]


def _run(*extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TINY, *extra], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_tiny_cpu_run_prints_the_figures_and_passes_its_checks():
    proc = _run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "FSDP2 fp32 master / bf16 compute" in out
    assert "precision: weights float32, AdamW states float32, layers computed in bfloat16" in out
    chunk = int(re.search(r"log-prob chunk (\d+)", out).group(1))
    assert chunk < int(re.search(r"(\d+) response tokens", out).group(1))  # the chunked head ran, several chunks
    losses = [float(x) for x in re.findall(r"step \d+: loss (\S+),", out)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert float(re.search(r"tokens/s: (\d+)", out).group(1)) > 0
    assert float(re.search(r"peak memory: (\d+) MiB", out).group(1)) > 0
    mfu = float(re.search(r"MFU: ([\d.]+)% of 1 TFLOPS", out).group(1))
    assert 0 < mfu < 100
    assert "gpu_smoke: all checks passed" in out


def test_a_check_that_fails_fails_the_run_naming_it():
    proc = _run("--mfu-floor", "99")
    assert proc.returncode == 1
    assert re.search(r"gpu_smoke FAILED: MFU [\d.]+% below the floor of 99%", proc.stderr), proc.stderr[-2000:]
