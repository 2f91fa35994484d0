"""`bench/device_check.sh --dry-run` runs the GPU device check on CPU: the same code path (random
checkpoint -> platform LoRA/QLoRA setup -> timed steps; the transformers engine; the 70B probe), tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.integration


def test_the_device_check_runs_all_three_parts_on_cpu_and_reports_what_the_gpu_run_will(tmp_path):
    """bench/device_check.sh --dry-run: the script the GPU machine runs, end to end on tiny shapes, with the
    same JSON (tokens/s, peaks, planner figures, engine vs sequential generate, 70B extrapolation)."""
    committed = {f: f.read_bytes() for f in (ROOT / "bench" / "results").glob("device_check_*.json")}  # the GPU run's
    env = {**os.environ, "OUT": str(tmp_path), "TMPDIR": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finetune, serve, probe = (json.loads((tmp_path / f"device_check_{p}.json").read_text()) for p in ("finetune", "serve", "probe70b"))
    assert all(d["dry_run"] and d["device"] == "cpu" and d["versions"]["peft"] for d in (finetune, serve, probe))
    runs = {r["method"]: r for r in finetune["results"]}
    assert set(runs) == {"lora", "qlora"} and runs["qlora"]["quantized_layers"] > 0 == runs["lora"]["quantized_layers"]
    assert all(r["tokens_per_s"] > 0 and r["planner"]["total_gib"] > 0 for r in runs.values())
    systems = [(r["system"], r["concurrency"]) for r in serve["results"]]
    assert systems == [("hf_engine", 1), ("hf_engine", 2), ("sequential_generate", 1)]
    assert all(r["output_tokens"] == r["requests"] * serve["workload"]["output_tokens"] for r in serve["results"])
    assert serve["engine"]["device"] == "cpu" and set(serve["engine_vs_sequential"]) == {"1", "2"}
    features = serve["features"]  # on the GPU run these say the engine samples, and mixes adapters, right on CUDA
    assert features["seeded_sampling_repeats"] and features["adapter_rows_differ_from_base"] and features["base_rows_unchanged_in_mixed_batch"]
    assert [r["layers"] for r in probe["results"]] == [1, 2] and probe["extrapolation"]["layers"] > 2
    assert "engine_vs_sequential" in proc.stdout and "extrapolation" in proc.stdout
    assert {f: f.read_bytes() for f in committed} == committed  # a dry run leaves the GPU results alone
