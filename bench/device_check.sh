#!/usr/bin/env bash
# The one prepared GPU check (issue 19). Three parts, each its own process with its own time limit,
# each writing JSON as it measures (bench/device_check.py):
#   finetune  LoRA (seq 2048) and QLoRA (NF4 + double quant, paged AdamW, micro-batch 1, seq 1024) on a
#             random Llama 2 7B through the platform's model setup and training step: tokens/s, MFU, peak memory
#   serve     the transformers engine on the GPU at 1, 8 and 16 streams (64-token prompts, 128 output
#             tokens) against `generate` run sequentially in the same process
#   probe70b  QLoRA at 1 and 2 decoder layers of the 70B shape, extrapolated to 80 layers, with the
#             planner's figure beside it
#
#   bash bench/device_check.sh prepare     # HERE (CPU, PyPI): wheels + 32k tokenizer into .devcarry/ (~60 MB)
#   bash bench/device_check.sh             # ON THE GPU MACHINE, carrying .devcarry (device `run`, timeout_s 560)
#   bash bench/device_check.sh --dry-run   # CPU, tiny shapes, ~30 s (tests/integration/finetune/test_bench_dry_run.py)
#
# The device image has torch, transformers, peft and accelerate and no network: the wheels carried are
# the GPU image's pins (constraints/gpu.txt) of what the check imports, installed with --no-deps into
# /tmp/site, so the check runs on the GPU image's transformers/peft/bitsandbytes; nothing is fetched.
# Results go to $OUT (the device tool brings that folder back) or bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.devcarry
PY=${PYTHON:-python3}
[ "${1:-}" = "--dry-run" ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
# name==version from constraints/gpu.txt where it pins them; pydantic's from constraints/cpu.txt
WHEEL_NAMES="bitsandbytes transformers peft pydantic pydantic-core annotated-types typing-inspection typing-extensions"

pins() {
  for name in $WHEEL_NAMES; do
    pin=$(grep -ihE "^${name//-/[-_]}==" constraints/gpu.txt constraints/cpu.txt | head -1)
    [ -n "$pin" ] || pin=$(.venv/bin/pip list --format=freeze 2>/dev/null | grep -iE "^${name//-/[-_]}==" | head -1)
    [ -n "$pin" ] || { echo "no pin for $name in constraints/ or .venv" >&2; return 1; }
    echo "$pin"
  done
}

if [ "${1:-}" = "prepare" ]; then
  rm -rf "$CARRY/wheels" && mkdir -p "$CARRY/wheels" "$CARRY/tok32k"
  grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || echo '/.devcarry/' >> .git/info/exclude
  # shellcheck disable=SC2046
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" $(pins) || exit 1
  .venv/bin/python - "$CARRY/tok32k" <<'EOF' || exit 1
import importlib.util, sys
from pathlib import Path
sys.path.insert(0, "platform")
spec = importlib.util.spec_from_file_location("bench_serve", "bench/serve.py")
serve = importlib.util.module_from_spec(spec); spec.loader.exec_module(serve)
from llmplatform.tiny import tokenizer as tiny_tok
out = Path(sys.argv[1])
if not (out / "tokenizer.model").is_file():
    tiny_tok.write_tokenizer(out, 4096, serve._spm_32k())
EOF
  du -sh "$CARRY"; ls "$CARRY/wheels"
  exit 0
fi

DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
RESULTS=${OUT:-bench/results}
[ -n "$DRY" ] && RESULTS=${OUT:-${TMPDIR:-/tmp}/llmp-device-check-dry-results}  # a dry run never replaces the GPU results
mkdir -p "$RESULTS"
if [ -z "$DRY" ]; then
  [ -d "$CARRY/wheels" ] || { echo "no $CARRY/wheels: run 'bash bench/device_check.sh prepare' here and carry .devcarry" >&2; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/wheels/*.whl || exit 2
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # a tmpfs for the random checkpoints (7B: 13 GB) when it has room, else the disk
  WORK=/tmp/llmp-device-check
  if [ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')" -ge 30 ] 2>/dev/null; then WORK=/dev/shm/llmp-device-check; fi
  TOK="--tokenizer $CARRY/tok32k"
  LIMITS="finetune:230 serve:150 probe70b:110"
else
  WORK=${TMPDIR:-/tmp}/llmp-device-check-dry
  TOK=""
  LIMITS="finetune:300 serve:300 probe70b:300"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
for item in $LIMITS; do
  part=${item%%:*}; limit=${item##*:}
  echo "== $part (limit ${limit} s) $(date -u +%H:%M:%S)"
  timeout -k 10 "$limit" $PY bench/device_check.py --part "$part" $DRY --workdir "$WORK" --out-dir "$RESULTS" $TOK
  rc=$?
  [ $rc -eq 0 ] || { echo "== $part failed (exit $rc)"; status=1; }
done
rm -rf "$WORK"
$PY - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path
for part in ("finetune", "serve", "probe70b"):
    f = Path(sys.argv[1]) / f"device_check_{part}.json"
    if not f.is_file():
        print(f"{part}: no results"); continue
    d = json.loads(f.read_text())
    for r in d["results"]:
        keys = ("method", "system", "layers", "concurrency", "seq_len", "micro_batch", "tokens_per_s", "tok_per_s", "mfu",
                "lora_hfu", "peak_allocated_gib", "ttft_p50_ms", "error")
        print(part, {k: r[k] for k in keys if k in r}, "planner:", r.get("planner", {}).get("without_overhead_gib"))
    for k in ("engine_vs_sequential", "extrapolation", "matmul_tflops_measured", "part_s"):
        if k in d:
            print(part, k, d[k])
EOF
exit $status
