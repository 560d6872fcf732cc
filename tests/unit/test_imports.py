"""torl/ is pure logic: importing every torl.* module must not pull in ray, vllm or wandb.

That keeps torl/ importable, and its unit tests runnable, without a cluster, an inference engine or a W&B account.
"""

import pkgutil
import subprocess
import sys
from pathlib import Path

import torl

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "vllm", "wandb")


def _torl_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(torl.__path__, prefix="torl."))


def test_torl_modules_are_found():
    names = _torl_modules()
    for core in (
        "torl.config",
        "torl.data.problems",
        "torl.rl.grading",
        "torl.data.prompts",
        "torl.rollout.tool_protocol",
        "torl.rollout.types",
    ):
        assert core in names


def test_importing_torl_does_not_import_ray_vllm_wandb():
    code = (
        "import importlib, sys\n"
        f"for name in {_torl_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"torl modules import {proc.stdout.strip()}"
