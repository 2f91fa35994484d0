"""The interface every job backend implements, and the job record it keeps.

A job moves validating -> queued -> running -> succeeded | failed | cancelled. The record holds
what `platformctl finetune status/list` shows: state, the failure reason in plain words, step
and total, the latest metrics, the last checkpoint step, the MLflow run and the registered
version. Backends are composed (no base-class logic): `JobBackend` is a `Protocol`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Iterator, Protocol

from llmplatform.resolve import Resolved

STATES = ("validating", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
TARGETS = ("local", "ray", "k8s")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class JobRecord:
    """One fine-tuning job as the platform sees it (JSON-serialisable)."""

    id: str
    name: str
    target: str
    state: str = "validating"
    reason: str | None = None  # why it failed or was cancelled, in plain words
    submitted: str = field(default_factory=now_iso)
    started: str | None = None
    ended: str | None = None
    address: str | None = None  # Ray Jobs API URL (local/ray) or namespace (k8s)
    tracking_uri: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    step: int = 0
    total: int | None = None
    metrics: dict = field(default_factory=dict)  # latest per-step metrics
    eval_metrics: dict = field(default_factory=dict)  # latest eval_* metrics
    checkpoint_step: int | None = None
    restarts: int = 0  # worker-group restarts seen (resumed from a checkpoint)
    registered_model: str | None = None
    version: str | None = None
    spec: dict = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def progress(self) -> str:
        return f"{self.step}/{self.total}" if self.total else "-"

    @property
    def duration_s(self) -> float | None:
        if not self.started:
            return None
        end = datetime.fromisoformat(self.ended) if self.ended else datetime.now(timezone.utc)
        return round((end - datetime.fromisoformat(self.started)).total_seconds(), 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "progress": self.progress, "duration_s": self.duration_s}

    @classmethod
    def from_dict(cls, data: dict) -> "JobRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> dict:
        """The row `finetune list` prints."""
        return {
            "id": self.id, "name": self.name, "state": self.state, "progress": self.progress,
            "last_loss": round(self.metrics["loss"], 4) if "loss" in self.metrics else None,
            "started": self.started, "duration_s": self.duration_s, "target": self.target,
        }


class JobBackend(Protocol):
    """What `platformctl finetune` needs from a target."""

    target: str

    def submit(self, plan: Resolved, record: JobRecord) -> JobRecord:
        """Start the job of a resolved plan (`llmplatform.resolve`); fills address/run fields, state queued."""

    def refresh(self, record: JobRecord) -> JobRecord:
        """Update state, progress and metrics from the target."""

    def logs(self, record: JobRecord, follow: bool = False) -> Iterator[str]:
        """The job's log text (chunks; with `follow`, until the job ends)."""

    def cancel(self, record: JobRecord) -> JobRecord:
        """Stop the workers, mark the run killed; state cancelled."""
