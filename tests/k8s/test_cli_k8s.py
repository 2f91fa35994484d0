"""`platformctl finetune|serve ... --target k8s` against the in-memory API server (kmock), through a
real kubeconfig file: with the real kopf operator running (the module's `operator` fixture) while a
test plays KubeRay by writing the RayJob/RayService status KubeRay would write, and against an
API server where no operator runs."""

from __future__ import annotations

import json

import pytest
import yaml

from llmplatform.backends.k8s import CANCEL_ANNOTATION
from llmplatform.cli.main import main
from llmplatform.kube import KubeApi, connect

from k8s_harness import InMemoryCluster, eventually

NS = "team-a"  # the namespace of the kubeconfig's context: no test passes -n unless it says why


def _kubeconfig(tmp_path, url: str, namespace: str = NS, name: str = "kubeconfig"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": namespace}},
                     {"name": "other", "context": {"cluster": "kmock", "user": "u", "namespace": "team-other"}}],
    }))
    return str(path)


def _finetune_spec(tmp_path, name: str) -> str:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "base_model": "llama2-tiny", "data": {"train": str(train)}}))
    return str(spec)


@pytest.fixture()
def kube(cluster, operator, tmp_path, monkeypatch) -> list[str]:
    """CLI flags for the module's API server (operator running); the namespace comes from the context."""
    monkeypatch.delenv("PLATFORM_K8S_NAMESPACE", raising=False)
    monkeypatch.delenv("PLATFORM_K8S_CONTEXT", raising=False)
    return ["--target", "k8s", "--kubeconfig", _kubeconfig(tmp_path, cluster.url)]


@pytest.fixture()
def api(cluster) -> KubeApi:
    return connect(host=cluster.url)


def test_finetune_target_k8s_round_trip_in_the_contexts_namespace(kube, api, tmp_path, capsys):
    assert main(["finetune", "submit", _finetune_spec(tmp_path, "cli-job"), *kube, "-o", "json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["name"], created["namespace"]) == ("cli-job", NS)  # from the kubeconfig context, no -n given
    assert created["phase"] == "Pending" and created["ray_job"] == "cli-job"  # the operator picked it up before submit returned
    assert api.get("FineTuneJob", "default", "cli-job") is None

    assert main(["finetune", "list", *kube, "-o", "json"]) == 0
    assert "cli-job" in [r["name"] for r in json.loads(capsys.readouterr().out)]

    assert main(["finetune", "status", "cli-job", *kube]) == 0
    out = capsys.readouterr().out
    assert "namespace      team-a" in out and "phase          Pending" in out

    assert main(["finetune", "cancel", "cli-job", *kube]) == 0
    assert "FineTuneJob team-a/cli-job: cancel requested" in capsys.readouterr().out

    assert main(["finetune", "status", "nope", *kube]) == 1
    assert "no FineTuneJob team-a/nope" in capsys.readouterr().err


def test_namespace_flag_and_context_flag_override_the_current_context(kube, api, tmp_path, capsys):
    spec = _finetune_spec(tmp_path, "ns-job")
    assert main(["finetune", "submit", spec, *kube, "--context", "other", "--operator-timeout", "0", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["namespace"] == "team-other"
    assert main(["finetune", "submit", spec, *kube, "-n", "team-flag", "--operator-timeout", "0", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["namespace"] == "team-flag"
    assert api.get("FineTuneJob", "team-other", "ns-job") and api.get("FineTuneJob", "team-flag", "ns-job")


def _kuberay_writes_rayjob(api: KubeApi, name: str, **status) -> None:
    """What KubeRay writes on the RayJob the operator created (as in test_operator_kmock)."""
    eventually(lambda: api.get("RayJob", NS, name), what=f"RayJob {name} created")
    api.patch_status("RayJob", NS, name, status)


def _follow_in_thread(argv: list[str]):
    import threading

    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(argv)), daemon=True)
    thread.start()
    return thread, result


def test_follow_prints_each_change_and_exits_0_on_succeeded(kube, api, tmp_path, capsys, monkeypatch):
    from llmplatform.cli import finetune

    monkeypatch.setattr(finetune, "K8S_POLL_S", 0.2)
    thread, result = _follow_in_thread(["finetune", "submit", _finetune_spec(tmp_path, "follow-ok"), *kube, "--follow"])
    _kuberay_writes_rayjob(api, "follow-ok", jobDeploymentStatus="Running", jobStatus="RUNNING", jobId="follow-ok-x1",
                           rayClusterName="follow-ok-raycluster-abc", startTime="2026-11-27T10:00:00Z")
    api.create({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "follow-ok-raycluster-abc", "namespace": NS}, "spec": {}})
    eventually(lambda: (api.get("FineTuneJob", NS, "follow-ok").get("status") or {}).get("progress"), what="progress in status")
    api.patch_status("RayJob", NS, "follow-ok", {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete", "endTime": "2026-11-27T11:00:00Z"})
    thread.join(30)
    assert result.get("rc") == 0
    out = capsys.readouterr().out
    assert "FineTuneJob team-a/follow-ok created; following" in out
    lines = out.splitlines()
    assert any(line.startswith("Running (JobRunning): training") for line in lines)
    assert any("progress 5/20 steps (25%)" in line and "mlflow run run-follow-ok-" in line for line in lines)
    assert lines[-1].startswith("Succeeded (JobSucceeded): training finished")


def test_wait_exits_non_zero_with_the_message_on_failed(kube, api, tmp_path, capsys, monkeypatch):
    from llmplatform.cli import finetune

    monkeypatch.setattr(finetune, "K8S_POLL_S", 0.2)
    thread, result = _follow_in_thread(["finetune", "submit", _finetune_spec(tmp_path, "follow-bad"), *kube, "--wait", "-o", "json"])
    _kuberay_writes_rayjob(api, "follow-bad", jobDeploymentStatus="Running", jobStatus="FAILED", jobId="follow-bad-x1",
                           message="ValueError: dataset is empty")
    thread.join(30)
    assert result.get("rc") == 1  # the exit code of a failed local job (JobError)
    captured = capsys.readouterr()
    final = json.loads(captured.out)
    assert (final["namespace"], final["phase"], final["reason"]) == (NS, "Failed", "AppFailed")
    assert "FineTuneJob team-a/follow-bad Failed: the training job failed: ValueError: dataset is empty" in captured.err


def test_ctrl_c_stops_following_and_leaves_the_job_running(kube, api, tmp_path):
    """A real `platformctl` process, interrupted as a user would (SIGINT) while it follows."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def as_in_a_terminal() -> None:
        # A foreground command in a terminal gets SIGINT at its default. A test run started in the
        # background by a script inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "llmplatform.cli.main", "finetune", "submit", _finetune_spec(tmp_path, "follow-int"),
                             *kube, "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=as_in_a_terminal)
    try:
        lines = []
        while not any(line.startswith("Pending") for line in lines):  # the operator's first status, printed
            line = proc.stdout.readline()
            assert line, f"platformctl ended early: {proc.wait()} {proc.stderr.read()}"
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "FineTuneJob team-a/follow-int keeps running" in err
    assert "`platformctl finetune cancel follow-int --target k8s -n team-a`" in err
    cr = api.get("FineTuneJob", NS, "follow-int")
    assert cr is not None and CANCEL_ANNOTATION not in (cr["metadata"].get("annotations") or {})


def test_serve_deploy_target_k8s_creates_then_updates_the_model_deployment(kube, api, tmp_path, capsys, fake_registry):
    fake_registry.aliases["models:/support-bot@production"] = "7"
    spec = tmp_path / "serve.yaml"
    body = {"name": "cli-serve", "engine": "vllm", "model": {"base": "llama2-7b-chat", "registry": "models:/support-bot@production"}}
    spec.write_text(yaml.safe_dump(body))

    assert main(["serve", "deploy", str(spec), *kube, "--operator-timeout", "0", "-o", "json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["name"], row["namespace"], row["action"]) == ("cli-serve", NS, "created")

    spec.write_text(yaml.safe_dump({**body, "max_loaded_adapters": 3}))
    assert main(["serve", "deploy", str(spec), *kube, "--operator-timeout", "0"]) == 0
    assert "ModelDeployment team-a/cli-serve updated" in capsys.readouterr().out
    cr = api.get("ModelDeployment", NS, "cli-serve")
    assert cr["spec"]["max_loaded_adapters"] == 3 and cr["spec"]["model"]["registry"] == "models:/support-bot@production"

    spec.write_text(yaml.safe_dump({**body, "tensor_parallel": 3}))  # bad input: refused before anything is sent
    assert main(["serve", "deploy", str(spec), *kube]) != 0
    assert "tensor_parallel" in capsys.readouterr().err
    assert api.get("ModelDeployment", NS, "cli-serve")["spec"]["max_loaded_adapters"] == 3


def test_serve_list_status_delete_through_the_model_deployment(kube, api, tmp_path, capsys, fake_registry):
    fake_registry.aliases["models:/cli-bot@production"] = "4"
    spec = tmp_path / "bot.yaml"
    spec.write_text(yaml.safe_dump({"name": "cli-bot", "model": {"base": "llama2-tiny", "adapters": [{"name": "support", "source": "models:/cli-bot@production"}]}}))
    assert main(["serve", "deploy", str(spec), *kube]) == 0  # waits for the operator's first status
    assert "ModelDeployment team-a/cli-bot created (phase Deploying)" in capsys.readouterr().out

    eventually(lambda: api.get("RayService", NS, "cli-bot"), what="RayService created")
    # what KubeRay writes once the Serve app runs (as in test_operator_kmock)
    api.patch_status("RayService", NS, "cli-bot", {"serviceStatus": "Running", "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"}]})
    eventually(lambda: (api.get("ModelDeployment", NS, "cli-bot").get("status") or {}).get("phase") == "Ready", what="Ready")

    assert main(["serve", "list", *kube, "-o", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["cli-bot"]["phase"] == "Ready" and rows["cli-bot"]["endpoint"] == "http://cli-bot-serve-svc.team-a.svc:8000"
    assert main(["serve", "list", *kube]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "NAMESPACE", "PHASE", "SERVED", "ENDPOINT", "MESSAGE"]
    assert any(line.split()[:3] == ["cli-bot", "team-a", "Ready"] for line in table[1:])

    assert main(["serve", "status", "cli-bot", *kube, "-o", "json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["phase"], st["ray_service"], st["namespace"]) == ("Ready", "cli-bot", NS)
    assert st["served"]  # the version the operator resolved the alias to

    # chat goes to status.endpoint, the cluster-DNS name of the serve Service: from here, say how to reach it
    assert main(["serve", "chat", "cli-bot", "Hello", *kube]) == 1
    err = capsys.readouterr().err
    assert "http://cli-bot-serve-svc.team-a.svc:8000/v1" in err
    assert "kubectl port-forward -n team-a svc/cli-bot-serve-svc 8000:8000` and pass --url http://127.0.0.1:8000" in err

    assert main(["serve", "delete", "cli-bot", *kube]) == 0
    assert "deleted ModelDeployment team-a/cli-bot" in capsys.readouterr().out
    assert api.get("ModelDeployment", NS, "cli-bot") is None
    eventually(lambda: api.get("RayService", NS, "cli-bot") is None, what="RayService garbage-collected")
    assert main(["serve", "delete", "cli-bot", *kube]) == 1
    assert "no ModelDeployment team-a/cli-bot" in capsys.readouterr().err


def test_finetune_target_k8s_refuses_a_job_that_cannot_fit_before_creating_anything(kube, api, tmp_path, capsys):
    spec = tmp_path / "too-big.yaml"
    spec.write_text(yaml.safe_dump({"name": "too-big", "base_model": "llama2-70b", "data": {"train": "s3://b/t.jsonl"},
                                    "resources": {"gpu_type": "t4-16gb", "strategy": "ddp"}}))
    assert main(["finetune", "submit", str(spec), *kube]) == 1
    err = capsys.readouterr().err
    assert "cannot be satisfied" in err and "resources.gpu_type" in err and "gradient_checkpointing: true" in err
    assert api.get("FineTuneJob", NS, "too-big") is None


def test_no_operator_watching_is_reported_instead_of_hanging(tmp_path, capsys, monkeypatch):
    """An API server where no operator runs (as when -n names a namespace the operator doesn't watch)."""
    import time

    monkeypatch.delenv("PLATFORM_K8S_NAMESPACE", raising=False)
    monkeypatch.setenv("PLATFORM_K8S_OPERATOR_TIMEOUT", "1.5")
    with InMemoryCluster() as bare:
        kube = ["--target", "k8s", "--kubeconfig", _kubeconfig(tmp_path, bare.url, namespace="team-z")]
        started = time.monotonic()
        assert main(["finetune", "submit", _finetune_spec(tmp_path, "orphan"), *kube, "--follow"]) == 1
        assert time.monotonic() - started < 15
        err = capsys.readouterr().err
        assert "no llm-platform operator has picked up FineTuneJob team-z/orphan" in err
        assert "watches namespace 'team-z'" in err and "kubectl get deployments -A -l app.kubernetes.io/name=llm-operator" in err
        assert connect(host=bare.url).get("FineTuneJob", "team-z", "orphan") is not None  # left in place, and said so

        spec = tmp_path / "orphan-serve.yaml"
        spec.write_text(yaml.safe_dump({"name": "orphan-serve", "model": {"base": "llama2-tiny"}}))
        assert main(["serve", "deploy", str(spec), *kube, "--operator-timeout", "1"]) == 1
        assert "no llm-platform operator has picked up ModelDeployment team-z/orphan-serve" in capsys.readouterr().err
