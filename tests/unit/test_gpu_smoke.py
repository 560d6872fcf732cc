"""bench/gpu_smoke.py's tiny CPU version runs (seconds) and prints its figures and a finite loss."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_prints_the_figures():
    cmd = [sys.executable, "bench/gpu_smoke.py", "--tiny", "--device", "cpu", "--peak-tflops", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    chunk = int(re.search(r"log-prob chunk (\d+)", out).group(1))
    assert chunk < int(re.search(r"(\d+) response tokens", out).group(1))  # the chunked head ran, several chunks
    losses = [float(x) for x in re.findall(r"step \d+: loss (\S+),", out)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert float(re.search(r"tokens/s: (\d+)", out).group(1)) > 0
    assert float(re.search(r"peak memory: (\d+) MiB", out).group(1)) > 0
    mfu = float(re.search(r"MFU: ([\d.]+)% of 1 TFLOPS", out).group(1))
    assert 0 < mfu < 100
