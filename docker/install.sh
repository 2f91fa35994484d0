#!/usr/bin/env bash
# Install llm-platform with its operator and cluster extras, and vLLM on CUDA, into the current
# Python environment, at the pins of constraints/$VARIANT.txt: what the Dockerfile runs on top
# of rayproject/ray:2.60.0-py311-gpu, and what tests/k8s/test_image_*.py run without Docker.
#
#   docker/install.sh [--dry-run] [--report FILE] [--no-deps] [SRC]   # SRC defaults to the repo root
#
#   --dry-run      resolve and print what would be installed, change nothing (pip --dry-run)
#   --report FILE  write pip's JSON installation report to FILE (with --dry-run: what would be installed)
#   --no-deps      install only the package itself, not its dependencies (the install test uses this)
# Env: PYTHON (default python3); VARIANT: gpu (default: extras operator,cluster,gpu, pins
# constraints/gpu.txt: torch 2.14.0 CUDA + vLLM 0.33.0) or cpu (extras operator,cluster, pins
# constraints/cpu.txt: torch 2.13.0, no vLLM; the GPU-less image for kind/CI); EXTRAS overrides
# the variant's extras.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VARIANT="${VARIANT:-gpu}"
case "$VARIANT" in
  gpu) DEFAULT_EXTRAS=operator,cluster,gpu ;;
  cpu) DEFAULT_EXTRAS=operator,cluster ;;
  *) echo "install.sh: VARIANT=$VARIANT is not a variant (use VARIANT=gpu or VARIANT=cpu)" >&2; exit 2 ;;
esac
EXTRAS="${EXTRAS:-$DEFAULT_EXTRAS}"
DRY=()
REPORT=()
NODEPS=0
SRC=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=(--dry-run) ;;
    --report) [ "$#" -ge 2 ] || { echo "install.sh: --report needs a FILE" >&2; exit 2; }; REPORT=(--report "$2"); shift ;;
    --no-deps) NODEPS=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $1 (use --dry-run, --report FILE, --no-deps)" >&2; exit 2 ;;
    *) SRC="$1" ;;
  esac
  shift
done
SRC="${SRC:-$(cd "$(dirname "$0")/.." && pwd)}"
[ -f "$SRC/pyproject.toml" ] || { echo "install.sh: no pyproject.toml in $SRC" >&2; exit 2; }

PIP=("$PYTHON" -m pip install --disable-pip-version-check "${DRY[@]}" "${REPORT[@]}")
if [ "$NODEPS" = 1 ]; then
  # The package alone: no dependency resolution (pip still fetches the build backend,
  # setuptools>=68, from its cache or PyPI into an isolated build env).
  "${PIP[@]}" --no-deps "$SRC"
else
  CONSTRAINTS="$SRC/constraints/$VARIANT.txt"
  [ -f "$CONSTRAINTS" ] || { echo "install.sh: no $CONSTRAINTS (copy constraints/ next to pyproject.toml)" >&2; exit 2; }
  # One resolution over everything, torch included (pinned by the constraints): ray[...]==2.60.0
  # is already in the base image and the pin keeps it; vLLM brings its CUDA 13 torch/triton/flashinfer.
  "${PIP[@]}" -c "$CONSTRAINTS" "${SRC}[${EXTRAS}]"
fi
if [ "${#DRY[@]}" = 0 ]; then
  "$PYTHON" - "$VARIANT" "$NODEPS" <<'PY'
import importlib.util, sys
variant, nodeps = sys.argv[1], sys.argv[2] == "1"
wanted = ["llmplatform", "llmoperator", "llmoperator.handlers", "llmplatform.kube", "llmplatform.backends.k8s"]
if variant == "gpu" and not nodeps:
    wanted.append("vllm")  # find_spec only: importing vllm needs a GPU driver, absent at build time
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
sys.exit(f"install.sh: installed, but cannot find {missing}" if missing else 0)
PY
  echo "install.sh: llm-platform ($VARIANT) installed into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
fi
