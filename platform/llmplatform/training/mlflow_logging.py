"""MLflow bookkeeping for a fine-tuning job: one run per job.

The run is created before the workers start (so the CLI can print its URL at submit time);
params are the whole spec, flattened to dotted keys; rank 0 logs per-step metrics through
`StepLogger`; at the end the driver uploads the final adapter (peft format), tokenizer files,
the spec and the data statistics, never the base weights, and registers the adapter with its
lineage when the spec names a registered model.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from llmplatform.specs import FineTuneSpec

PARAM_LIMIT = 6000  # MLflow's max param value length


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists become JSON text."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    out[prefix.rstrip(".")] = text[:PARAM_LIMIT]
    return out


def git_sha() -> str:
    """The commit of the code that runs, or "unknown" outside a git checkout."""
    import os

    if os.environ.get("PLATFORM_GIT_SHA"):
        return os.environ["PLATFORM_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def run_url(tracking_uri: str, run_id: str, experiment_id: str | None = None) -> str:
    if experiment_id is None:
        experiment_id = client(tracking_uri).get_run(run_id).info.experiment_id
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def create_run(tracking_uri: str, spec: FineTuneSpec, job_id: str, tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Create the job's run (status RUNNING) with the spec as params; returns (run_id, url)."""
    from mlflow.entities import Param

    from llmplatform.registry.client import experiment_id

    c = client(tracking_uri)
    exp_id = experiment_id(c, spec.mlflow.experiment)
    all_tags = {"platform.job_id": job_id, "base_model": spec.base_model, "method": spec.method, "git_sha": git_sha(), **(tags or {})}
    run = c.create_run(exp_id, run_name=job_id, tags=all_tags)
    params = [Param(k, v) for k, v in flatten(spec.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id, run_url(tracking_uri, run.info.run_id, exp_id)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(tracking_uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(tracking_uri: str, run_id: str, status: str, force: bool = False) -> None:
    """Mark the run FINISHED, FAILED or KILLED; an ended run keeps its status unless `force`."""
    c = client(tracking_uri)
    if not force and c.get_run(run_id).info.status in ("FINISHED", "FAILED", "KILLED"):
        return
    c.set_terminated(run_id, status=status)


def end_child_runs(tracking_uri: str, parent_run_id: str, status: str) -> None:
    """End every still-running child run of `parent_run_id` (a sweep's trials) with `status`."""
    c = client(tracking_uri)
    parent = c.get_run(parent_run_id)
    for run in c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            c.set_terminated(run.info.run_id, status=status)


class StepLogger:
    """Per-step metrics from rank 0, sent in small batches so a step doesn't wait on HTTP."""

    def __init__(self, tracking_uri: str, run_id: str, every_s: float = 2.0):
        self.client, self.run_id, self.every_s = client(tracking_uri), run_id, every_s
        self.pending: list = []
        self.last_flush = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self.last_flush >= self.every_s:
            self.flush()

    def latest(self, names) -> dict[str, float]:
        """The run's latest values of `names` (a resumed attempt continues cumulative metrics)."""
        metrics = self.client.get_run(self.run_id).data.metrics
        return {n: metrics[n] for n in names if n in metrics}

    def flush(self) -> None:
        for i in range(0, len(self.pending), 500):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 500])
        self.pending = []
        self.last_flush = time.monotonic()


def log_outputs(tracking_uri: str, run_id: str, adapter_dir: Path, tokenizer_dir: Path | None, spec: FineTuneSpec, data_stats: dict) -> None:
    """Upload adapter/, tokenizer/, spec.yaml and data_stats.json to the run (no base weights)."""
    c = client(tracking_uri)
    c.log_artifacts(run_id, str(adapter_dir), "adapter")
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        c.log_artifacts(run_id, str(tokenizer_dir), "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        (Path(tmp) / "data_stats.json").write_text(json.dumps(data_stats, indent=2, default=str))
        c.log_artifact(run_id, str(Path(tmp) / "spec.yaml"))
        c.log_artifact(run_id, str(Path(tmp) / "data_stats.json"))


def log_resolved(tracking_uri: str, run_id: str, plan: dict) -> None:
    """The job's resolved plan as the run's `resolved.json` (what every worker ran with)."""
    client(tracking_uri).log_dict(run_id, plan, "resolved.json")


def register(tracking_uri: str, spec: FineTuneSpec, adapter_dir: Path, run_id: str, lineage: dict, base_dir: str | None) -> str | None:
    """Register the adapter as a new version of `spec.mlflow.registered_model_name`."""
    if not spec.mlflow.registered_model_name:
        return None
    from llmplatform.registry import register_adapter

    version = register_adapter(tracking_uri, spec.mlflow.registered_model_name, adapter_dir, run_id, lineage, base_model_dir=base_dir)
    return str(getattr(version, "version", version))
