"""Evaluation jobs on Ray through the Jobs API, the way fine-tuning jobs are submitted.

`submit` starts `python -m llmplatform.evaluation.entrypoint` (the same runner `--target local`
runs in-process) on the cluster of a `RayJobsBackend` (the local stack's, or RAY_ADDRESS's) with
the job id as submission id, and records the job under `paths.jobs_dir()/eval/<id>.json` (apart
from the fine-tuning records). `refresh` takes the state and failure reason from the Jobs API and
the report from the job's `eval_report` log line into `record.metrics`.
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from pathlib import Path

from llmplatform import paths
from llmplatform.backends.base import JobRecord
from llmplatform.errors import EvalError
from llmplatform.specs import EvaluationSpec


def records_dir() -> Path:
    return paths.jobs_dir() / "eval"


def new_eval_id(spec: EvaluationSpec) -> str:
    """A unique, DNS-safe id: `eval-<name>-<yyyymmdd-hhmmss>-<4 hex>`."""
    return f"eval-{spec.name[:35]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def entrypoint_command(python: str, spec: EvaluationSpec, tracking_uri: str) -> str:
    """The shell command the Ray job runs."""
    parts = [python, "-m", "llmplatform.evaluation.entrypoint", "--spec-json",
             json.dumps(spec.model_dump(mode="json"), separators=(",", ":")), "--tracking-uri", tracking_uri]
    return " ".join(shlex.quote(p) for p in parts)


def save(record: JobRecord) -> JobRecord:
    directory = records_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{record.id}.tmp"
    tmp.write_text(json.dumps(record.to_dict(), indent=2, default=str))
    tmp.replace(directory / f"{record.id}.json")
    return record


def list_records() -> list[JobRecord]:
    """Every recorded evaluation job, newest first."""
    directory = records_dir()
    found = []
    for path in directory.glob("*.json") if directory.is_dir() else []:
        try:
            found.append(JobRecord.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda r: r.submitted, reverse=True)


def submit(backend, spec: EvaluationSpec, tracking_uri: str | None) -> JobRecord:
    """Submit the job to `backend`'s cluster and record it (state queued)."""
    from llmplatform.reach import require_reachable

    tracking = tracking_uri
    if not tracking:
        raise EvalError("no MLflow tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    require_reachable(tracking, "the MLflow tracking server", "start it (`platformctl up` for the local one) "
                      "or pass --tracking-uri / MLFLOW_TRACKING_URI to a running server", EvalError)
    record = JobRecord(id=new_eval_id(spec), name=spec.name, target=backend.target, spec=spec.model_dump(mode="json"))
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", **backend.env}
    try:
        backend.client().submit_job(entrypoint=entrypoint_command(backend.python, spec, tracking), submission_id=record.id,
                                    runtime_env={"env_vars": env}, metadata={"platform.name": spec.name, "platform.kind": "eval"})
    except EvalError:
        raise
    except Exception as exc:
        raise EvalError(f"the Ray Jobs API at {backend.address} refused evaluation job {record.id}: {exc}") from exc
    record.address, record.tracking_uri, record.state = backend.address, tracking, "queued"
    return save(record)


def refresh(backend, record: JobRecord) -> JobRecord:
    """State and reason from the Jobs API; the report from the job log."""
    from llmplatform.backends.ray_jobs import parse_events

    if record.terminal:
        return record
    backend.refresh(record)
    for event in parse_events(backend.client().get_job_logs(record.id)):
        if event.get("kind") == "eval_report":
            record.metrics = {k: v for k, v in event.items() if k != "kind"}
    return save(record)


def wait(backend, record: JobRecord, timeout_s: float, poll_s: float = 1.0) -> JobRecord:
    """Refresh until the job ends; EvalError after `timeout_s` (the job keeps running)."""
    deadline = time.monotonic() + timeout_s
    while not refresh(backend, record).terminal:
        if time.monotonic() > deadline:
            raise EvalError(f"evaluation job {record.id} still {record.state} after {timeout_s:.0f} s; "
                            "it keeps running: `platformctl eval list` shows it")
        time.sleep(poll_s)
    return record
