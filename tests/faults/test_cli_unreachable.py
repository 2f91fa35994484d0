"""A CLI call to an MLflow, Ray or Kubernetes API that does not answer fails within 15 s with one
line naming the address and the fix, and no traceback (MLflow's client alone retried for 254 s)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.faults

PLATFORMCTL = [sys.executable, "-m", "llmplatform.cli.main"]
LIMIT_S = 15


@pytest.fixture()
def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def kubeconfig(tmp_path, closed_port):
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:{closed_port}", insecure-skip-tls-verify: true}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    return path


def run_cli(args: list[str], home, **env) -> tuple[subprocess.CompletedProcess, float]:
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "KUBECONFIG")}
    full.update(PLATFORM_HOME=str(home), **env)
    start = time.monotonic()
    proc = subprocess.run([*PLATFORMCTL, *args], env=full, capture_output=True, text=True, timeout=LIMIT_S * 4)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("case", ["models list", "models show", "finetune list k8s", "serve list", "serve status"])
def test_an_unreachable_service_fails_fast_in_one_line(case, closed_port, kubeconfig, tmp_path):
    mlflow = f"http://127.0.0.1:{closed_port}"
    args, address, fix = {
        "models list": (["models", "list", "--tracking-uri", mlflow], mlflow, "--tracking-uri"),
        "models show": (["models", "show", "m", "--tracking-uri", mlflow], mlflow, "--tracking-uri"),
        "finetune list k8s": (["finetune", "list", "--target", "k8s", "--kubeconfig", str(kubeconfig)],
                              f"https://127.0.0.1:{closed_port}", "--kubeconfig"),
        "serve list": (["serve", "list", "--ray-address", f"127.0.0.1:{closed_port}"], f"127.0.0.1:{closed_port}", "--ray-address"),
        "serve status": (["serve", "status", "x", "--ray-address", f"127.0.0.1:{closed_port}"], f"127.0.0.1:{closed_port}", "--ray-address"),
    }[case]
    proc, took = run_cli(args, tmp_path / "home")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and took < LIMIT_S, (took, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert address in lines[0] and fix in lines[0] and "cannot reach" in lines[0]


def test_a_job_on_an_unreachable_ray_jobs_api_fails_fast_in_one_line(closed_port, tmp_path):
    from llmplatform.backends import records
    from llmplatform.backends.base import JobRecord

    home = tmp_path / "home"
    address = f"http://127.0.0.1:{closed_port}"
    os.environ["PLATFORM_HOME"] = str(home)
    try:
        records.save(JobRecord(id="j-1", name="j", target="ray", state="running", address=address))
    finally:
        os.environ.pop("PLATFORM_HOME")
    proc, took = run_cli(["finetune", "status", "j-1"], home)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and took < LIMIT_S and len(lines) == 1, (took, proc.stderr[-2000:])
    assert address in lines[0] and "RAY_ADDRESS" in lines[0]
