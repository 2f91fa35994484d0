"""bench/eval.py runs end to end in its CPU dry-run mode (llama2-tiny-random, 8 examples)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]


def test_eval_bench_quick_measures_the_job_and_the_sequential_loop_on_the_same_examples(tmp_path):
    out = tmp_path / "eval.json"
    committed = (ROOT / "bench/results/eval.json").read_bytes() if (ROOT / "bench/results/eval.json").exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "bench/eval.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["workload"]["examples"] == 8 and result["workload"]["batch_size"] == 4
    assert result["ours"]["examples"] == 8 and result["ours"]["examples_per_s"] > 0
    assert [r["examples"] for r in result["sequential"]["runs"]] == [8, 8] and len(result["ours"]["runs"]) == 1 and result["sequential"]["examples_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours"]["examples_per_s"] / result["sequential"]["examples_per_s"], rel=0.02)  # median job / median sequential
    assert result["answers_agree"] >= 0.75  # both greedy over the same prompts: the same answers
    assert "| eval job (`hf` engine, batch 4) |" in done.stdout
    if committed is not None:
        assert (ROOT / "bench/results/eval.json").read_bytes() == committed  # --out leaves the committed results alone
