"""Stack bookkeeping with real (tiny) processes: state file, PID ownership, group stop, ports.

These run in seconds: they start `sleep`-like processes, never Ray or MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pytest

from llmplatform import stack
from llmplatform.errors import PortInUseError, StackError
from llmplatform.stack import lifecycle
from llmplatform.stack.ports import check_ports_free, free_port, port_is_free
from llmplatform.stack.processes import (
    ProcessRecord,
    group_members,
    group_is_ours,
    is_ours,
    pid_alive,
    proc_start_time,
    start_process,
    stop_group,
    wait_healthy,
)
from llmplatform.stack.state import ComponentState, read_state, write_state

PY = sys.executable
# a parent that starts a child in its OWN process group (like Ray's task workers), then waits
SPAWNS_OWN_GROUP = "import subprocess, time; subprocess.Popen(['sleep', '60'], process_group=0); time.sleep(60)"
IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def _alive(pid: int) -> bool:
    return pid_alive(pid)


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def started(tmp_path):
    """Start processes in their own sessions; whatever a test leaves running is stopped after it."""
    records: list[ProcessRecord] = []

    def start(code: str) -> ProcessRecord:
        record = start_process([PY, "-c", code], tmp_path / f"p{len(records)}.log")
        records.append(record)
        return record

    yield start
    for record in records:
        stop_group(record, timeout=1)


def test_state_round_trip_records_what_down_needs(tmp_path, started):
    record = started("import time; time.sleep(60)")
    comp = ComponentState("mlflow", record, "http://127.0.0.1:1234", {"http": 1234}, "2026-01-01T00:00:00+00:00")
    path = write_state(tmp_path, {"mlflow": comp})
    raw = json.loads(path.read_text())["components"]["mlflow"]
    assert raw["process"]["pid"] == record.pid == raw["process"]["pgid"]
    assert raw["process"]["start_time"] == proc_start_time(record.pid)
    assert raw["url"] == "http://127.0.0.1:1234"
    assert read_state(tmp_path)["mlflow"] == comp
    write_state(tmp_path, {})
    assert not path.exists() and read_state(tmp_path) == {}


def test_corrupt_state_file_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "stack.json").write_text("{not json")
    with pytest.raises(StackError) as err:
        stack.status(tmp_path)
    assert str(tmp_path / "stack.json") in str(err.value) and "delete the file" in str(err.value)


def test_pid_ownership_uses_the_recorded_start_time(started):
    record = started("import time; time.sleep(60)")
    assert is_ours(record)
    reused = ProcessRecord(record.pid, record.pgid, record.start_time + 1, record.command, record.log)
    assert not is_ours(reused)  # same PID, different process: not ours
    assert not group_is_ours(reused)


def test_stop_refuses_a_pid_that_now_belongs_to_another_process(started):
    stranger = started("import time; time.sleep(60)")
    stale = ProcessRecord(stranger.pid, stranger.pgid, stranger.start_time - 5, [], "")
    assert stop_group(stale, timeout=1) is False
    time.sleep(0.3)
    assert _alive(stranger.pid)


def test_stop_ends_the_whole_session_including_children_in_their_own_groups(started):
    record = started(SPAWNS_OWN_GROUP)
    assert _wait_for(lambda: len(group_members(record.pgid)) == 2)
    members = group_members(record.pgid)
    assert stop_group(record, timeout=2) is True
    assert group_members(record.pgid) == []
    assert not any(_alive(pid) for pid in members)
    assert not is_ours(record)


def test_stop_kills_what_ignores_sigterm_after_the_grace_period(started):
    record = started(IGNORES_TERM)
    time.sleep(0.5)  # let it install the handler
    t0 = time.monotonic()
    assert stop_group(record, timeout=1.0)
    assert not _alive(record.pid)
    assert 0.9 <= time.monotonic() - t0 < 6


def test_leftovers_of_a_dead_leader_are_still_stopped(started):
    record = started(SPAWNS_OWN_GROUP)
    assert _wait_for(lambda: len(group_members(record.pgid)) == 2)
    os.kill(record.pid, signal.SIGKILL)
    assert _wait_for(lambda: not is_ours(record))
    orphans = group_members(record.pgid)
    assert orphans and group_is_ours(record)  # the leader is gone, its session's child is ours
    stop_group(record, timeout=1)
    assert not any(_alive(pid) for pid in orphans)


def test_status_reports_a_dead_component_and_up_would_restart_it(tmp_path, started):
    record = started("import time; time.sleep(60)")
    comp = ComponentState("mlflow", record, "http://127.0.0.1:9", {"http": 9}, "t")
    write_state(tmp_path, {"mlflow": comp})
    assert stack.status(tmp_path).component("mlflow").state == "running"
    stop_group(record, timeout=1)
    info = stack.status(tmp_path)
    assert info.component("mlflow").state == "dead" and not info.component("mlflow").healthy
    assert info.component("ray").state == "stopped" and not info.healthy


def test_a_component_that_dies_while_starting_is_reported_with_its_log(started):
    record = started("print('cannot open the database'); raise SystemExit(3)")
    with pytest.raises(StackError) as err:
        wait_healthy({"MLflow server": (record, lambda: False)}, timeout=30)
    assert "MLflow server" in str(err.value) and "exited" in str(err.value)
    assert "cannot open the database" in str(err.value)


def test_a_component_that_never_gets_healthy_times_out(started):
    record = started("import time; print('still loading', flush=True); time.sleep(60)")
    with pytest.raises(StackError, match="did not become healthy within 1s") as err:
        wait_healthy({"Ray head": (record, lambda: False)}, timeout=1)
    assert "still loading" in str(err.value)


def test_free_port_is_free_and_a_listening_port_is_not():
    port = free_port()
    assert port_is_free(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not port_is_free(port)
        with pytest.raises(PortInUseError) as err:
            check_ports_free([("MLflow server", port, "--mlflow-port")])
    message = str(err.value)
    assert f"port {port}" in message and "MLflow server" in message and "--mlflow-port" in message


def test_up_rejects_bad_or_duplicate_ports_before_starting_anything(tmp_path):
    with pytest.raises(StackError, match="--ray-port 0"):
        stack.up(tmp_path, ray_port=0, dashboard_port=free_port(), mlflow_port=free_port())
    port = free_port()
    with pytest.raises(StackError, match="same port"):
        stack.up(tmp_path, ray_port=free_port(), dashboard_port=port, mlflow_port=port)
    assert read_state(tmp_path) == {}


def test_tracking_uri_and_ray_address_prefer_env_then_say_how_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for fn in (stack.tracking_uri, stack.ray_address):
        with pytest.raises(StackError, match="platformctl up"):
            fn(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("RAY_ADDRESS", "ray.example:6379")
    assert stack.tracking_uri(tmp_path) == "http://mlflow.example:5000"
    assert stack.ray_address(tmp_path) == "ray.example:6379"


def test_platform_home_is_the_default_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PLATFORM_HOME", str(tmp_path))
    assert lifecycle.status().home == str(tmp_path.resolve())


def test_stdlib_platform_module_is_not_shadowed():
    import platform

    assert platform.system() and platform.__file__.startswith(os.path.dirname(os.__file__))
