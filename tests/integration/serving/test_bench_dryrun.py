"""bench/serve.py and bench/gpu_serve.py run end to end in their CPU dry-run modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]


def test_serve_bench_quick_measures_every_available_system(tmp_path):
    out = tmp_path / "serve.json"
    have_vllm = (ROOT / ".venv-vllm/bin/python").exists()
    systems = "hf_endpoint,hf_endpoint_adapters,sequential,continuous_batching" + ("" if have_vllm else ",vllm_direct")  # vllm: `make test-vllm`
    cmd = [sys.executable, str(ROOT / "bench/serve.py"), "--quick", "--concurrency", "1,4", "--prompts", "4", "--output-tokens", "8",
           "--systems", systems, "--out", str(out), "--cache", str(tmp_path / "models")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    for system in ("hf_endpoint", "hf_endpoint_adapters", "sequential", "continuous_batching"):
        assert system in result["systems"], result["skipped"]
        for level in ("1", "4"):
            r = result["systems"][system][level]
            assert r["requests"] == 4 and r["output_tokens"] == 32 and r["tok_per_s"] > 0
    assert result["systems"]["hf_endpoint"]["4"]["ttft_p50_ms"] > 0
    if not have_vllm:
        assert "not found" in result["skipped"]["vllm_direct"]
    assert result["targets"]["hf_vs_sequential"] is not None
    assert result["targets"]["hf_adapters_vs_base"] is not None  # the 4 requests went to 4 adapters, each answered
    assert result["workload"]["adapters"]["count"] == 8


def test_gpu_bench_dry_run_reports_skip_or_results(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench/gpu_serve.py"), "--dry-run", "--out", str(out), "--cache", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert "not importable" in result["skipped"]["vllm_endpoint"]
    else:
        assert result["systems"] or result["skipped"]
