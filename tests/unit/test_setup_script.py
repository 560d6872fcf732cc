"""scripts/setup.sh on a CPU machine installs the +cpu torch of the cpu extra's pin: from a local wheel where pip's
find-links hold one, else from PyTorch's CPU index (#28; from PyPI alone the cpu extra is unresolvable and
``torch==2.13.0`` there is the CUDA build).

The script runs for real against a stand-in venv whose ``python`` records each pip command and answers pip's
local-wheel probe as the case asks, with an ``nvidia-smi`` that lists no GPU; nothing is installed (tens of ms).
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
case "$*" in *"--dry-run --no-deps --no-index"*) exit "$FAKE_PROBE_RC" ;; esac
"""


def _cpu_torch_pin() -> str:
    cpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cpu"]
    (pin,) = [r.removeprefix("torch==") for r in cpu if r.startswith("torch==")]
    return pin


def _run_setup(tmp_path: Path, local_wheel: bool) -> list[str]:
    venv, bin_dir, log = tmp_path / "venv", tmp_path / "bin", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in ((venv / "bin" / "python", FAKE_PYTHON), (bin_dir / "nvidia-smi", "#!/bin/sh\nexit 1\n")):
        path.write_text(text)
        path.chmod(0o755)
    env = {
        **os.environ,
        "TORL_VENV": str(venv),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_PROBE_RC": "0" if local_wheel else "1",
    }
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]


@pytest.mark.parametrize("local_wheel", [True, False])
def test_cpu_torch_comes_from_a_local_wheel_else_pytorchs_cpu_index(tmp_path: Path, local_wheel: bool):
    torch_cpu = f"torch=={_cpu_torch_pin()}+cpu"
    probe, torch_install, project, *_ = _run_setup(tmp_path, local_wheel)
    assert probe == f"-m pip install --dry-run --no-deps --no-index {torch_cpu}"
    index = "--index-url https://download.pytorch.org/whl/cpu"
    assert torch_install.endswith(torch_cpu) and (index in torch_install) != local_wheel, torch_install
    assert project.endswith("-e .[cpu,dev]")
