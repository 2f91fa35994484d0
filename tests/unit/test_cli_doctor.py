"""`platformctl doctor` as a user runs it: warnings for what is optional, an error naming a port's holder."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from llmplatform import cpus, doctor
from llmplatform.cli.main import main
from llmplatform.stack.ports import free_port
from llmplatform.stack.processes import ProcessRecord
from llmplatform.stack.state import ComponentState, write_state


@pytest.fixture
def laptop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh home: no kubeconfig, no stack state, not in a pod."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PLATFORM_HOME", str(tmp_path / ".llm-platform"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return tmp_path


def run_doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["doctor", *args, "-o", "json"])
    return code, json.loads(capsys.readouterr().out)


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_this_machine_lists_missing_pieces_as_warnings_and_exits_0(laptop, capsys):
    code, report = run_doctor(capsys, "--port", str(free_port()))
    checks = by_name(report)
    assert code == 0 and report["ok"] is True
    assert {"python", "torch", "ray", "mlflow", "vllm", "gpu", "disk", "kubeconfig", "operator"} <= set(checks)
    assert checks["kubeconfig"]["status"] == "warning" and "KUBECONFIG" in checks["kubeconfig"]["fix"]
    assert checks["operator"]["status"] == "warning"
    if not cpus.gpu_present():
        assert checks["gpu"]["status"] == "warning" and "nvidia-smi" in checks["gpu"]["fix"]
    assert all(c["fix"] for c in report["checks"] if c["status"] != "ok"), "every problem names its fix"


def test_table_output_counts_errors_and_warnings(laptop, capsys):
    code = main(["doctor", "--port", str(free_port()), "--no-cluster"])
    out = capsys.readouterr().out
    assert code == 0 and "STATUS" in out and "kubeconfig" in out and "0 error(s)" in out


def test_a_port_taken_by_another_process_is_an_error_naming_port_and_process(laptop, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, report = run_doctor(capsys, "--port", str(port))
        table_code = main(["doctor", "--port", str(port), "--no-cluster"])
        table = capsys.readouterr().out
    check = by_name(report)[f"port {port}"]
    assert code == 1 and table_code == 1 and report["ok"] is False
    assert check["status"] == "error"
    assert f"127.0.0.1:{port}" in check["detail"] and f"pid {os.getpid()}" in check["detail"] and "python" in check["detail"]
    assert f"kill {os.getpid()}" in check["fix"] and "another port" in check["fix"]
    assert f"pid {os.getpid()}" in table and "1 error(s)" in table


def test_a_port_held_by_this_homes_stack_is_fine(laptop, capsys):
    record = ProcessRecord(pid=os.getpid(), pgid=os.getpgid(0), start_time=0, command=["ray"], log="")
    write_state(laptop / ".llm-platform", {"ray": ComponentState("ray", record, "http://x", {"gcs": 1}, "now")})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, report = run_doctor(capsys, "--port", str(port), "--no-cluster")
    assert code == 0 and "local stack" in by_name(report)[f"port {port}"]["detail"]


def test_old_python_and_missing_torch_are_errors():
    assert doctor.check_python((3, 9, 18)).status == "error"
    assert doctor.check_python((3, 12, 1)).status == "ok"
    missing = doctor.check_package("torch", "training", version=lambda _: None)
    assert missing.status == "error" and "make install" in missing.fix


def test_gpu_check_distinguishes_no_device_from_a_cpu_torch():
    assert doctor.check_gpu(lambda: False, lambda: True).status == "warning"
    no_cuda = doctor.check_gpu(lambda: True, lambda: False)
    assert no_cuda.status == "warning" and "CUDA build of torch" in no_cuda.fix
    assert doctor.check_gpu(lambda: True, lambda: True).status == "ok"


def test_disk_thresholds(tmp_path):
    gib = 2**30
    assert doctor.check_disk(tmp_path / "not-yet" / "models", usage=lambda _: (0, 0, 0.5 * gib)).status == "error"
    low = doctor.check_disk(tmp_path, usage=lambda _: (0, 0, 5 * gib))
    assert low.status == "warning" and "PLATFORM_MODEL_CACHE" in low.fix
    assert doctor.check_disk(tmp_path, usage=lambda _: (0, 0, 100 * gib)).status == "ok"


def test_kubeconfig_and_operator(tmp_path):
    config = tmp_path / "kc"
    config.write_text("apiVersion: v1\n")
    found = doctor.check_kubeconfig({"KUBECONFIG": str(config), "HOME": str(tmp_path)})
    assert found.status == "ok"
    assert doctor.check_kubeconfig({"HOME": str(tmp_path)}).status == "warning"
    no_crds = doctor.check_operator(found, probe=lambda: ([], []))
    assert no_crds.status == "warning" and "manifests/crds" in no_crds.fix
    no_op = doctor.check_operator(found, probe=lambda: (list(doctor.CRD_NAMES), []))
    assert no_op.status == "warning" and "overlays" in no_op.fix
    assert doctor.check_operator(found, probe=lambda: (list(doctor.CRD_NAMES), ["llm-system/llm-operator"])).status == "ok"

    def unreachable():
        raise ConnectionRefusedError("connection refused")

    down = doctor.check_operator(found, probe=unreachable)
    assert down.status == "warning" and "connection refused" in down.detail


def test_vllm_missing_is_a_warning_with_the_make_target():
    check = doctor.check_vllm(find_spec=lambda _: None)
    assert check.status == "warning" and ".venv-vllm" in check.fix


def test_a_default_port_names_the_up_flag_that_moves_it():
    component, port, flag = doctor.ports_to_check([5000])[0]
    assert (component, port, flag) == ("MLflow server", 5000, "--mlflow-port")
    assert doctor.ports_to_check([]) == list(doctor.STACK_PORTS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        check = doctor.check_port("MLflow server", sock.getsockname()[1], "--mlflow-port")
    assert check.status == "error" and "platformctl up --mlflow-port <free port>" in check.fix
