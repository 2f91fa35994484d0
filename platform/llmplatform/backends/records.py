"""Job records on disk: one `<id>.json` per job under `paths.jobs_dir()`, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from llmplatform import paths
from llmplatform.backends.base import JobRecord
from llmplatform.errors import JobError


def record_path(job_id: str) -> Path:
    return paths.jobs_dir() / f"{job_id}.json"


def save(record: JobRecord) -> JobRecord:
    directory = paths.jobs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".job", dir=directory)
    with os.fdopen(fd, "w") as fh:
        json.dump(record.to_dict(), fh, indent=2, default=str)
    os.replace(tmp, record_path(record.id))
    return record


def load(job_id: str) -> JobRecord:
    path = record_path(job_id)
    if not path.is_file():
        known = [r.id for r in list_records()][:5]
        hint = f"; known jobs: {', '.join(known)}" if known else "; `platformctl finetune list` shows the jobs"
        raise JobError(f"no fine-tuning job {job_id!r} in {paths.jobs_dir()}{hint}")
    return JobRecord.from_dict(json.loads(path.read_text()))


def list_records() -> list[JobRecord]:
    """Every recorded job, newest first."""
    directory = paths.jobs_dir()
    if not directory.is_dir():
        return []
    records = []
    for path in directory.glob("*.json"):
        try:
            records.append(JobRecord.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # a half-written or foreign file is not a job
    return sorted(records, key=lambda r: r.submitted, reverse=True)
