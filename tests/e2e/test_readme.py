"""The README works as written: every ```bash runnable block runs, in order, from the repo root.

Blocks run with `bash -euo pipefail` in a fresh `PLATFORM_HOME`; the stack they start is
stopped afterwards by `platformctl down` (by PID), whatever happened.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def runnable_blocks(text: str) -> list[str]:
    return [m.group(1) for m in BLOCK.finditer(text)]


def test_readme_shows_the_two_commands_first():
    text = (REPO / "README.md").read_text()
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_readme_runnable_blocks_work_as_written(tmp_path):
    blocks = runnable_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 3, "the README lost its runnable tour"
    env = {**os.environ, "PLATFORM_HOME": str(tmp_path / "home")}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    try:
        for block in blocks:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=400)
            assert proc.returncode == 0, f"README block failed:\n{block}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    finally:
        subprocess.run([str(REPO / ".venv/bin/platformctl"), "down"], cwd=REPO, env=env, capture_output=True, timeout=120)
