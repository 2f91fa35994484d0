#!/usr/bin/env bash
# Build .venv-llamacpp: llama.cpp's Python binding (PyPI `llama-cpp-python`, built from source for
# this CPU) for the optional llamacpp test tier, which checks that a GGUF export answers what the
# merged model answers in transformers.   Usage: scripts/setup-llama-cpp.sh [VENV_DIR]
# PyPI has only the sdist, so pip compiles llama.cpp: needs cmake and a C/C++ compiler (Debian:
# build-essential cmake); ~21 min on 2 cores (measured 2026-12-05, niced beside other work). Its own venv: nothing of the project is needed there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-llamacpp}"
PY="${PY:-python3}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# CPU only, no OpenMP-less fallbacks; the native CPU flags of the build machine
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$VENV/bin/pip" install -q --no-cache-dir "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
"$VENV/bin/python" - <<'PY'
import llama_cpp
print(f"llama-cpp-python {llama_cpp.__version__}: ok")
PY
