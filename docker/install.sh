#!/usr/bin/env bash
# Install llm-platform (with the operator and cluster extras) into the current Python
# environment: what the Dockerfile runs on top of rayproject/ray:2.60.0-py311-gpu, and what
# tests/k8s/test_image_install.py runs in a fresh venv.
#
#   docker/install.sh [--dry-run] [--no-deps] [SRC]      # SRC defaults to the repo root
#
#   --dry-run   resolve and print what would be installed, change nothing (pip --dry-run)
#   --no-deps   install only the package itself, not its dependencies (the test uses this)
# Env: PYTHON (default python3), EXTRAS (default operator,cluster), TORCH_SPEC (default
# torch==2.13.0: pinned first so pip never swaps in another build; "" skips it).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-operator,cluster}"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
DRY=()
NODEPS=0
SRC=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=(--dry-run) ;;
    --no-deps) NODEPS=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $arg (use --dry-run, --no-deps)" >&2; exit 2 ;;
    *) SRC="$arg" ;;
  esac
done
SRC="${SRC:-$(cd "$(dirname "$0")/.." && pwd)}"
[ -f "$SRC/pyproject.toml" ] || { echo "install.sh: no pyproject.toml in $SRC" >&2; exit 2; }

PIP=("$PYTHON" -m pip install --disable-pip-version-check "${DRY[@]}")
if [ "$NODEPS" = 1 ]; then
  # The package alone: no dependency resolution (pip still fetches the build backend,
  # setuptools>=68, from its cache or PyPI into an isolated build env).
  "${PIP[@]}" --no-deps "$SRC"
else
  if [ -n "$TORCH_SPEC" ]; then "${PIP[@]}" "$TORCH_SPEC"; fi
  # ray[...]==2.60.0 is already in the base image; the pin in pyproject keeps it there.
  "${PIP[@]}" "$SRC[$EXTRAS]"
fi
if [ "${#DRY[@]}" = 0 ]; then
  "$PYTHON" - <<'PY'
import importlib.util, sys
missing = [m for m in ("llmplatform", "llmoperator", "llmoperator.handlers", "llmplatform.kube", "llmplatform.backends.k8s") if importlib.util.find_spec(m) is None]
sys.exit(f"install.sh: installed, but cannot find {missing}" if missing else 0)
PY
  echo "install.sh: llm-platform installed into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
fi
