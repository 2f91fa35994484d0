"""`platformctl up/status/down` with the real Ray head and MLflow server.

One up/down cycle is shared by the lifecycle test (the expensive part, ~1.5 min on 2 cores):
up -> status -> second up -> a run in MLflow and a Ray job -> crash + restart of one component ->
down (nothing of ours left) -> up again shows the same run -> down.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmplatform import cpus
from llmplatform.stack.ports import free_port, port_is_free
from llmplatform.stack.processes import group_members

pytestmark = pytest.mark.integration

PLATFORMCTL = [sys.executable, "-m", "llmplatform.cli.main"]
REPO = Path(__file__).resolve().parents[2]


def platformctl(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PLATFORM_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*PLATFORMCTL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def as_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def components(info: dict) -> dict[str, dict]:
    return {c["name"]: c for c in info["components"]}


def processes_mentioning(text: str) -> list[int]:
    """Live PIDs whose command line contains `text` (to catch anything that left our sessions)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if text in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def run_ray_job(dashboard_url: str, client_env: dict[str, str]) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from llmplatform.backends.ray_auth import use_client_env

    use_client_env(client_env)  # the stack's Ray token
    client = JobSubmissionClient(dashboard_url)
    job = client.submit_job(entrypoint="python -c \"print('hello from a ray job')\"")
    deadline = time.monotonic() + 120
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "ray job did not finish in 120 s"
        time.sleep(1)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED
    return client.get_job_logs(job)


def test_up_status_down_and_runs_survive_a_restart(tmp_path, monkeypatch):
    home = tmp_path / "home"
    ports = [free_port(), free_port(), free_port()]
    flags = ["--ray-port", str(ports[0]), "--dashboard-port", str(ports[1]), "--mlflow-port", str(ports[2])]

    try:
        first = platformctl(home, "up", *flags, "-o", "json")
        info = as_json(first)
        assert info["healthy"] and {c["state"] for c in info["components"]} == {"started"}
        assert "healthy" in first.stderr  # progress messages went to stderr
        assert info["ray_address"] == f"127.0.0.1:{ports[0]}"
        assert info["dashboard_url"] == f"http://127.0.0.1:{ports[1]}"
        assert info["mlflow_url"] == f"http://127.0.0.1:{ports[2]}"
        state = json.loads((home / "stack.json").read_text())["components"]
        sessions = {name: c["process"]["pgid"] for name, c in state.items()}
        temp_dir = state["ray"]["extra"]["temp_dir"]

        status = as_json(platformctl(home, "status", "-o", "json"))
        for name, comp in components(status).items():
            assert comp["healthy"] and comp["state"] == "running" and comp["pid"] == sessions[name]
        table = platformctl(home, "status")
        assert table.returncode == 0 and info["mlflow_url"] in table.stdout and "ray" in table.stdout

        # no GPU here: `auto` runs every Ray process on the front-end CPUs and tells workers the model CPUs
        partition = cpus.plan("auto", os.sched_getaffinity(0), cpus.gpu_present())
        assert info["cpu_partition"] == status["cpu_partition"] == (partition.to_dict() if partition else None)
        if partition:
            assert f"front end {info['cpu_partition']['front']}, model {info['cpu_partition']['model']}" in table.stdout
            head = group_members(sessions["ray"])
            assert len(head) > 3 and all(os.sched_getaffinity(pid) == set(partition.front) for pid in head)
            worker_env = Path(f"/proc/{sessions['ray']}/environ").read_bytes().split(b"\0")  # what every Ray process inherits
            assert f"{cpus.MODEL_ENV}={info['cpu_partition']['model']}".encode() in worker_env

        again = as_json(platformctl(home, "up", *flags, "-o", "json"))
        assert {c["state"] for c in again["components"]} == {"running"}
        assert {n: c["pid"] for n, c in components(again).items()} == sessions

        # the Python API finds the running stack through PLATFORM_HOME
        monkeypatch.setenv("PLATFORM_HOME", str(home))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        from llmplatform import stack

        assert stack.tracking_uri() == info["mlflow_url"] and stack.ray_address() == info["ray_address"]
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient(stack.tracking_uri())
        exp = client.create_experiment("stack-test")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "loss", 0.25)
        (tmp_path / "note.txt").write_text("kept across restarts")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        client.set_terminated(run.info.run_id)

        assert "hello from a ray job" in run_ray_job(info["dashboard_url"], info["client_env"])

        # a crashed component: status says so (exit 1), `up` restarts only that one
        os.killpg(sessions["mlflow"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(sessions["mlflow"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        broken = platformctl(home, "status", "-o", "json")
        assert broken.returncode == 1 and "platformctl up" in broken.stderr
        assert components(json.loads(broken.stdout))["mlflow"]["state"] == "dead"
        healed = as_json(platformctl(home, "up", *flags, "-o", "json"))
        by_name = components(healed)
        assert by_name["ray"]["state"] == "running" and by_name["ray"]["pid"] == sessions["ray"]
        assert by_name["mlflow"]["state"] == "started" and by_name["mlflow"]["pid"] != sessions["mlflow"]
        sessions["mlflow2"] = by_name["mlflow"]["pid"]

        down = platformctl(home, "down")
        assert down.returncode == 0 and "stopped" in down.stdout
        for name, sid in sessions.items():
            assert group_members(sid) == [], f"{name} left processes behind"
        assert processes_mentioning(temp_dir) == [] and not Path(temp_dir).exists()
        assert not (home / "stack.json").exists() and (home / "mlflow" / "mlflow.db").exists()
        assert all(port_is_free(p) for p in ports)
        stopped = platformctl(home, "status", "-o", "json")
        assert stopped.returncode == 1
        assert {c["state"] for c in json.loads(stopped.stdout)["components"]} == {"stopped"}

        # a later up shows the same run, metric and artifact
        restarted = as_json(platformctl(home, "up", *flags, "-o", "json"))
        try:
            client = MlflowClient(restarted["mlflow_url"])
            same = client.get_run(run.info.run_id)
            assert same.data.metrics["loss"] == 0.25
            assert client.get_experiment_by_name("stack-test").experiment_id == exp
            got = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="note.txt", dst_path=str(tmp_path / "dl"),
                tracking_uri=restarted["mlflow_url"],
            )  # fmt: skip
            assert Path(got).read_text() == "kept across restarts"
        finally:
            assert platformctl(home, "down").returncode == 0
    finally:  # a failed assertion above must not leave the stack running
        platformctl(home, "down")
    assert platformctl(home, "down").stdout.strip() == "nothing was running"


@pytest.mark.parametrize("flag, component", [("--mlflow-port", "MLflow server"), ("--ray-port", "Ray head")])
def test_a_taken_port_is_reported_and_nothing_starts(tmp_path, flag, component):
    home = tmp_path / "home"
    ports = {"--ray-port": free_port(), "--dashboard-port": free_port(), "--mlflow-port": free_port()}
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports[flag]))
        blocker.listen()
        args = [x for f, p in ports.items() for x in (f, str(p))]
        result = platformctl(home, "up", *args, timeout=60)
    assert result.returncode == 1
    assert f"port {ports[flag]}" in result.stderr and component in result.stderr and flag in result.stderr
    assert "Nothing was started" in result.stderr
    assert not (home / "stack.json").exists()
    assert all(port_is_free(p) for p in ports.values())  # blocker closed; nothing else took them


@pytest.mark.parametrize("value, needle", [("0,4096", "4096 are not available"), ("all", "not a CPU number"),
                                           ("ALLOWED", "leaves no CPU for the model")])
def test_a_bad_cpu_partition_is_reported_and_nothing_starts(tmp_path, value, needle):
    home = tmp_path / "home"
    value = cpus.format_cpu_list(os.sched_getaffinity(0)) if value == "ALLOWED" else value
    result = platformctl(home, "up", "--cpu-partition", value, "--ray-port", str(free_port()), timeout=60)
    assert result.returncode != 0 and f"--cpu-partition {value!r}" in result.stderr and needle in result.stderr
    assert not (home / "stack.json").exists()


def test_local_stack_fixture_runs_tasks_and_placement_groups(local_stack, monkeypatch):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from llmplatform.backends.ray_auth import use_client_env

    for key, value in local_stack.client_env.items():
        monkeypatch.setenv(key, value)
    use_client_env(local_stack.client_env)
    started = not ray.is_initialized()  # other tests of the session may already be connected to it
    if started:
        ray.init(address=local_stack.ray_address, log_to_driver=False)
    assert ray.get_runtime_context().gcs_address.endswith(local_stack.ray_address.rsplit(":", 1)[-1])
    try:
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        pg = placement_group([{"CPU": 2}, {"CPU": 2}], strategy="STRICT_PACK")  # > 2 real cores
        assert pg.wait(timeout_seconds=60)
        remove_placement_group(pg)
    finally:
        if started:
            ray.shutdown()


def test_mlflow_server_fixture_is_a_real_tracking_server(mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment(f"fixture-{time.time_ns()}"))
    client.log_param(run.info.run_id, "p", "v")
    assert client.get_run(run.info.run_id).data.params == {"p": "v"}


def test_stdlib_platform_still_imports_next_to_the_installed_package():
    import platform

    assert platform.system()
    code = "import platform, llmplatform, sys; platform.python_version(); print(platform.__file__)"
    for cwd in (REPO, REPO / "platform"):  # the source root is named `platform`: must not shadow it
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("/platform.py") and "/lib/python" in out.stdout
