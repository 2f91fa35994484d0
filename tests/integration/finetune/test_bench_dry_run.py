"""`bench/gpu_finetune.py --model llama2-tiny` runs on CPU as a dry run of the GPU benchmark:
same code path (random checkpoint -> platform LoRA/QLoRA setup -> timed steps), tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.integration


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_finetune.py"), "--model", "llama2-tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "llama2-tiny" and report["device"].startswith("cpu")
    by_method = {r["method"]: r for r in report["results"]}
    assert set(by_method) == {"lora", "qlora"}
    assert by_method["lora"]["quantized_layers"] == 0 and by_method["qlora"]["quantized_layers"] == 28
    for r in by_method.values():
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["trainable_params"] > 0
    assert "| qlora |" in proc.stdout
