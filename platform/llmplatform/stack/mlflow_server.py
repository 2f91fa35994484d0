"""The MLflow tracking server of the local stack: SQLite backend, artifacts proxied over HTTP.

`mlflow server` runs with `--serve-artifacts` and `--artifacts-destination`, so clients upload
and download artifacts through the server (`mlflow-artifacts:/` URIs) and need no shared
filesystem. One worker and no job-execution consumers keep it small on a 2-core machine; it
still spawns several processes, so it runs in its own process group (see processes.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmplatform.stack.ports import HOST
from llmplatform.stack.processes import ProcessRecord, http_ok, start_process, stop_group, wait_healthy

# MLflow 3 starts huey job consumers unless told not to; the platform doesn't use MLflow jobs.
MLFLOW_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}"


def mlflow_command(data_dir: Path, port: int, host: str = HOST, workers: int = 1) -> list[str]:
    """The `mlflow server` command line storing runs in `<data_dir>/mlflow.db`."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        "--backend-store-uri", f"sqlite:///{data_dir / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(data_dir / "artifacts"),
    ]  # fmt: skip


def start_mlflow(data_dir: Path, port: int, log_path: Path, host: str = HOST) -> ProcessRecord:
    """Start the server in its own process group; returns at once (see `mlflow_healthy`)."""
    data_dir = Path(data_dir).resolve()
    (data_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    return start_process(mlflow_command(data_dir, port, host), Path(log_path), env=MLFLOW_ENV)


def mlflow_healthy(url: str) -> bool:
    """The server answers `GET /health`."""
    return http_ok(f"{url}/health")


def run_mlflow(data_dir: Path, port: int, log_path: Path, timeout: float = 180.0) -> tuple[ProcessRecord, str]:
    """Start the server and wait until it is healthy; returns (record, tracking URL).

    On failure the process group is stopped and StackError (with the log tail) is raised.
    """
    record = start_mlflow(data_dir, port, log_path)
    url = mlflow_url(port)
    try:
        wait_healthy({"MLflow server": (record, lambda: mlflow_healthy(url))}, timeout)
    except BaseException:
        stop_group(record)
        raise
    return record, url


def stop_mlflow(record: ProcessRecord, timeout: float = 5.0) -> bool:
    """Stop the server's whole process group (uvicorn workers included)."""
    return stop_group(record, timeout)
