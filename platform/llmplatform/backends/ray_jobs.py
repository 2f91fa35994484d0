"""Fine-tuning jobs on any Ray cluster through the Ray Jobs API (`RAY_ADDRESS`).

`submit` creates the job's MLflow run (so its URL is known at once) and submits
`python -m llmplatform.training.entrypoint ...` with the job id as submission id. State comes
from the Jobs API; progress, checkpoints, restarts, the registered version and failure reasons
come from the `PLATFORM_PROGRESS {json}` lines the job prints. `cancel` stops the job (SIGTERM
to the driver, whose workers die with it) and marks the MLflow run KILLED.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from datetime import datetime, timezone
from typing import Iterator

from llmplatform.backends.base import JobRecord, now_iso
from llmplatform.errors import JobError
from llmplatform.rayaddress import FORMS
from llmplatform.resolve import Resolved
from llmplatform.specs import FineTuneSpec
from llmplatform.training.loop import PROGRESS_PREFIX

RAY_STATES = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "cancelled"}
EVENT = re.compile(re.escape(PROGRESS_PREFIX) + r"(\{.*\})\s*$")


def entrypoint_command(python: str, plan: Resolved, job_id: str, run_id: str | None, tracking_uri: str | None, base_dir: str | None,
                       module: str = "llmplatform.training.entrypoint", extra: list[str] | None = None) -> str:
    """The shell command the Ray job runs: the training entrypoint (or a sweep's) with the resolved plan."""
    parts = [python, "-m", module, *(extra or []), "--resolved-json", json.dumps(plan.to_dict(), separators=(",", ":")), "--job-id", job_id]
    for flag, value in (("--run-id", run_id), ("--tracking-uri", tracking_uri), ("--base-dir", base_dir)):
        if value:
            parts += [flag, value]
    return " ".join(shlex.quote(p) for p in parts)


def parse_events(log_text: str) -> list[dict]:
    """The `PLATFORM_PROGRESS` events in a job log, in order (Ray may prefix worker lines)."""
    events = []
    for line in log_text.splitlines():
        match = EVENT.search(line)
        if match:
            try:
                events.append(json.loads(match.group(1)))
            except ValueError:
                continue
    return events


def apply_events(record: JobRecord, events: list[dict]) -> JobRecord:
    """Fold progress events into the record (latest step, metrics, checkpoint, result, reason).

    The checkpoint step is the latest one reported, or after a restart the one training resumed
    from, whichever came last."""
    rank0_pids: set = set()
    for ev in events:
        kind = ev.get("kind")
        if kind == "run":
            record.run_id, record.run_url = ev.get("run_id") or record.run_id, ev.get("url") or record.run_url
        elif kind == "worker_start" and ev.get("rank") == 0:
            record.total = ev.get("total") or record.total
            rank0_pids.add(ev.get("pid"))
            if ev.get("resumed"):  # a checkpoint reported just before a crash may not be the one Ray kept
                record.checkpoint_step = ev.get("step")
        elif kind == "step":
            record.step, record.total = int(ev["step"]), ev.get("total") or record.total
            metrics = {k: v for k, v in ev.items() if k not in ("kind", "step", "total")}
            record.metrics = {k: v for k, v in metrics.items() if not k.startswith("eval_")}
            record.eval_metrics.update({k: v for k, v in metrics.items() if k.startswith("eval_")})
        elif kind == "checkpoint":
            record.checkpoint_step = ev.get("step")
        elif kind == "result":
            record.version = ev.get("version")
            record.registered_model = ev.get("registered_model")
        elif kind == "failed":
            record.reason = ev.get("reason")
    record.restarts = max(0, len(rank0_pids) - 1)  # lines can repeat; a new worker has a new pid
    return record


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else None


def _last_error_line(log_text: str) -> str | None:
    lines = [ln.strip() for ln in log_text.splitlines() if re.search(r"\b\w*(Error|Exception)\b:", ln)]
    return lines[-1][-500:] if lines else None


class RayJobsBackend:
    """Jobs on the Ray cluster whose Jobs API (dashboard) is at `address`."""

    def __init__(self, address: str, tracking_uri: str | None, *, target: str = "ray", env: dict[str, str] | None = None, python: str = "python", resolve_locally: bool = False):
        self.address, self.tracking_uri, self.target = address, tracking_uri, target
        self.env, self.python, self.resolve_locally = dict(env or {}), python, resolve_locally

    def client(self):
        from llmplatform.reach import require_reachable

        require_reachable(self.address, "the Ray Jobs API", "start the stack with `platformctl up`, or set "
                          "RAY_ADDRESS=http://HOST:8265 to a running cluster's dashboard", JobError)
        from ray.job_submission import JobSubmissionClient

        from llmplatform.backends.ray_auth import use_client_env

        # e.g. the local stack's token. Not RAY_ADDRESS: that one is for the job's processes; in this
        # process it would outlive the call and point a later ray.init (Serve, another stack) at this cluster
        use_client_env({k: v for k, v in self.env.items() if k != "RAY_ADDRESS"})
        try:
            return JobSubmissionClient(self.address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise JobError(f"cannot reach the Ray Jobs API at {self.address}: {exc}. Start the stack with `platformctl up`, or set RAY_ADDRESS to {FORMS}.") from exc

    def submit(self, plan: Resolved, record: JobRecord, module: str = "llmplatform.training.entrypoint", extra: list[str] | None = None) -> JobRecord:
        from llmplatform.training import mlflow_logging as ml

        spec: FineTuneSpec = plan.require().spec  # type: ignore[assignment]
        tracking = spec.mlflow.tracking_uri or self.tracking_uri  # the spec's own server wins
        if not tracking:
            raise JobError("no MLflow tracking server: set mlflow.tracking_uri in the spec or MLFLOW_TRACKING_URI")
        from llmplatform.reach import require_reachable

        require_reachable(self.tracking_uri, "the MLflow tracking server", "start it (`platformctl up` for the local "
                          "one) or set mlflow.tracking_uri in the spec / MLFLOW_TRACKING_URI to a running server", JobError)
        base_dir = None
        if self.resolve_locally:
            from llmplatform.basemodels import locate

            base_dir = locate(spec.base_model)
        record.run_id, record.run_url = ml.create_run(tracking, spec, record.id, {"platform.target": self.target})
        command = entrypoint_command(self.python, plan, record.id, record.run_id, tracking, base_dir, module, extra)
        env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", **self.env}
        try:
            self.client().submit_job(entrypoint=command, submission_id=record.id, runtime_env={"env_vars": env}, metadata={"platform.name": spec.name})
        except Exception as exc:
            ml.end_run(tracking, record.run_id, "FAILED")
            raise JobError(f"the Ray Jobs API at {self.address} refused job {record.id}: {exc}") from exc
        record.address, record.tracking_uri, record.state = self.address, tracking, "queued"
        return record

    def refresh(self, record: JobRecord) -> JobRecord:
        if record.terminal:
            return record
        client = self.client()
        try:
            info = client.get_job_info(record.id)
        except RuntimeError as exc:
            raise JobError(f"the Ray cluster at {self.address} does not know job {record.id}: {exc}") from exc
        logs = client.get_job_logs(record.id)
        apply_events(record, parse_events(logs))
        status = str(getattr(info.status, "value", info.status))
        record.state = RAY_STATES.get(status, record.state)
        record.started = _iso(info.start_time) or record.started
        record.ended = _iso(info.end_time) if record.terminal else None
        if record.state == "failed" and not record.reason:
            record.reason = _last_error_line(logs) or (info.message or "the job failed").strip()
        if record.state == "cancelled" and not record.reason:
            record.reason = "stopped through the Ray Jobs API"
        return record

    def logs(self, record: JobRecord, follow: bool = False) -> Iterator[str]:
        client, seen = self.client(), 0
        while True:
            text = client.get_job_logs(record.id)
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            if not follow:
                return
            status = str(getattr(client.get_job_status(record.id), "value", ""))
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                rest = client.get_job_logs(record.id)[seen:]
                if rest:
                    yield rest
                return
            time.sleep(1.0)

    def cancel(self, record: JobRecord, timeout_s: float = 60.0) -> JobRecord:
        from llmplatform.training import mlflow_logging as ml

        self.refresh(record)
        if record.terminal:
            raise JobError(f"job {record.id} already ended ({record.state}); nothing to cancel")
        client = self.client()
        client.stop_job(record.id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if str(getattr(client.get_job_status(record.id), "value", "")) in ("STOPPED", "FAILED", "SUCCEEDED"):
                break
            time.sleep(0.5)
        else:
            raise JobError(f"job {record.id} did not stop within {timeout_s:.0f} s; check `platformctl finetune logs {record.id}`")
        self.refresh(record)
        if record.run_id and self.tracking_uri and record.state != "succeeded":
            ml.end_run(self.tracking_uri, record.run_id, "KILLED", force=True)
            ml.end_child_runs(self.tracking_uri, record.run_id, "KILLED")  # a sweep's trials, should its driver die before marking them
        if record.state != "succeeded":
            record.state, record.reason, record.ended = "cancelled", "cancelled by the user", record.ended or now_iso()
        return record
