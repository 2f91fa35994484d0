"""Helpers for the fine-tuning integration tests: spec files and `platformctl` runs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PLATFORMCTL = [sys.executable, "-m", "llmplatform.cli.main"]


def write_spec(path: Path, name: str, train: Path, validation: Path | None = None, base: str = "llama2-tiny", **sections) -> Path:
    """A fine-tuning spec file for llama2-tiny (pretrained base); `sections` override/extend the defaults."""
    import yaml

    body = {
        "name": name, "base_model": base, "method": "lora",
        "data": {"train": str(train), "max_seq_length": 64, **({"validation": str(validation)} if validation else {})},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "hyperparameters": {"learning_rate": 2e-3, "max_steps": 20, "micro_batch_size": 16, "warmup_ratio": 0.05},
        "resources": {"workers": 1},
        "checkpoint": {"every_n_steps": 10},
        "eval": {"every_n_steps": 10, "max_batches": 2},
    }
    for key, value in sections.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def ctl(env: dict, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PLATFORMCTL, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"platformctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def start(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*PLATFORMCTL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def environment(env: dict):
    """Run in-process code with `env`'s platform/Ray variables (restored afterwards)."""
    keys = [k for k in env if k.startswith(("PLATFORM_", "RAY_", "MLFLOW_"))]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def status(env: dict, job_id: str) -> dict:
    """The job record, refreshed from the cluster (what `finetune status -o json` prints), in-process."""
    from llmplatform.backends import records
    from llmplatform.cli.finetune import refresh

    with environment(env):
        return refresh(records.load(job_id)).to_dict()


def events(env: dict, job_id: str) -> list[dict]:
    """The job's PLATFORM_PROGRESS events from its Ray job log."""
    from llmplatform.backends import records
    from llmplatform.backends.ray_jobs import parse_events
    from llmplatform.backends.targets import backend_of

    with environment(env):
        record = records.load(job_id)
        return parse_events("".join(backend_of(record).logs(record)))


def wait_until(predicate, timeout: float, every: float = 2.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_id_from(output: str) -> str:
    line = next(ln for ln in output.splitlines() if ln.startswith("job ") and " submitted to " in ln)
    return line.split()[1]
