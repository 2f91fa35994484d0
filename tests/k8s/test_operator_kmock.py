"""The operator, run for real (kopf) against kmock's in-memory Kubernetes API.

KubeRay itself isn't running, so each test plays KubeRay: it writes the RayJob/RayService status
that KubeRay would write, or deletes the RayCluster, and checks what a user sees on our CRs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time

import pytest
import yaml

from llmplatform.backends.k8s import cancel_finetune, finetune_job_cr, model_deployment_cr
from llmplatform.kube import KubeApi, connect
from llmplatform.specs import parse_spec

from k8s_harness import eventually

from llmoperator.reconcile.finetune import job_id

NS = "team-a"


def ftj(name: str = "support-lora", uid: str = "uid-ftj-1", **resources) -> dict:
    spec = parse_spec("finetune", {"name": name, "base_model": "llama2-7b", "method": "qlora",
                                   "data": {"train": "s3://data/support.jsonl"},
                                   "resources": {"workers": 2, "gpus_per_worker": 1, "gpu_type": "a100-80gb", **resources}})
    cr = finetune_job_cr(spec, NS)
    cr["metadata"]["uid"] = uid  # fixed, so owner references can be asserted
    return cr


def unique(request: pytest.FixtureRequest, prefix: str) -> str:
    """A DNS name per test: the operator and API server are shared by the module."""
    return f"{prefix}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"


def mdep(name: str, adapter_source: str, uid: str = "uid-md-1", registry_poll_s: float = 1.0) -> dict:
    spec = parse_spec("serve", {"name": name, "model": {"base": "llama2-7b-chat", "adapters": [{"name": "support", "source": adapter_source}]},
                                "tensor_parallel": 2, "resources": {"gpus_per_shard": 1}, "registry_poll_s": registry_poll_s})
    cr = model_deployment_cr(spec, NS)
    cr["metadata"]["uid"] = uid
    return cr


def status_of(api: KubeApi, kind: str, name: str) -> dict:
    return (api.get(kind, NS, name) or {}).get("status") or {}


def phase_is(api: KubeApi, name: str, phase: str):
    return lambda: status_of(api, "FineTuneJob", name) if status_of(api, "FineTuneJob", name).get("phase") == phase else None


def condition(st: dict, ctype: str) -> dict:
    [found] = [c for c in st.get("conditions") or [] if c["type"] == ctype]
    return found


def waitable(st: dict) -> set[str]:
    """The condition types `kubectl wait --for=condition=TYPE` would return for: status "True"."""
    return {c["type"] for c in st.get("conditions") or [] if c["status"] == "True"}


def kuberay_writes(api: KubeApi, name: str, **status) -> None:
    api.patch_status("RayJob", NS, name, status)


@pytest.fixture()
def api(cluster, operator) -> KubeApi:
    return connect(host=cluster.url)


@pytest.fixture(scope="module")
def kubeconfig(cluster, tmp_path_factory) -> str:
    """A kubeconfig for the real `kubectl` against the in-memory API server."""
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "kmock",
                                    "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
                                    "users": [{"name": "test", "user": {"token": "test"}}],
                                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NS}}]}))
    return str(path)


def kubectl_wait(kubeconfig: str, target: str, condition: str, timeout_s: int) -> subprocess.Popen:
    """`kubectl wait --for=condition=CONDITION TARGET`, started in the background (kubectl >= 1.27)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: these tests run the real `kubectl wait`; install kubectl >= 1.27")
    return subprocess.Popen([kubectl, "wait", f"--for=condition={condition}", target, f"--timeout={timeout_s}s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "KUBECONFIG": kubeconfig})


def finished(proc: subprocess.Popen, timeout_s: float = 30) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out + err


@pytest.fixture()
def running_job(api: KubeApi, request: pytest.FixtureRequest) -> str:
    """A FineTuneJob whose RayJob KubeRay reports as running on cluster `<name>-raycluster-abc`."""
    name = unique(request, "ft")
    api.create(ftj(name, uid=f"uid-{name}"))
    eventually(lambda: api.get("RayJob", NS, name), what="RayJob created")
    kuberay_writes(api, name, jobDeploymentStatus="Running", jobStatus="RUNNING", jobId=f"{name}-x1",
                   rayClusterName=f"{name}-raycluster-abc", dashboardURL=f"{name}-head-svc.team-a.svc:8265",
                   startTime="2026-11-27T10:00:00Z")
    api.create({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": f"{name}-raycluster-abc", "namespace": NS}, "spec": {}})
    st = eventually(phase_is(api, name, "Running"), what="phase Running")
    assert waitable(st) == {"Running"}
    return name


def test_finetunejob_creates_the_expected_rayjob(api: KubeApi, manifest_validator) -> None:
    api.create(ftj())
    rayjob = eventually(lambda: api.get("RayJob", NS, "support-lora"), what="RayJob created")
    assert rayjob["metadata"]["labels"]["llmplatform.io/finetunejob"] == "support-lora"
    manifest_validator.validate({k: v for k, v in rayjob.items() if k != "status"})
    spec = rayjob["spec"]
    assert rayjob["metadata"]["ownerReferences"] == [{"apiVersion": "llmplatform.io/v1alpha1", "kind": "FineTuneJob", "name": "support-lora",
                                                      "uid": "uid-ftj-1", "controller": True, "blockOwnerDeletion": True}]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "llmplatform.training.entrypoint", "--resolved-json"]
    plan = json.loads(argv[4])
    assert plan["spec"]["base_model"] == "llama2-7b" and plan["spec"]["name"] == "support-lora"
    assert plan["values"]["use_gpu"]["value"] is True and plan["values"]["workers"]["value"] == 2  # what the pods were sized for
    assert argv[5:] == ["--job-id", job_id(ftj())]  # not the uid: a resubmit resumes (test_resubmit_...)
    [workers] = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 2
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "registry.example/llm-platform:test"
    assert {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": "llm-platform-mlflow", "key": "tracking-uri"}}} in container["env"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    st = eventually(phase_is(api, "support-lora", "Pending"), what="phase Pending")
    assert st["rayJobName"] == "support-lora"
    assert [c["type"] for c in st["conditions"]] == ["Running", "Succeeded", "Failed"] and waitable(st) == set()
    assert condition(st, "Running")["reason"] == st["reason"] and condition(st, "Running")["observedGeneration"] == 1


def test_success_is_mirrored_and_sticks_after_cleanup(api: KubeApi, running_job: str, kubeconfig: str) -> None:
    waiter = kubectl_wait(kubeconfig, f"finetunejob/{running_job}", "Succeeded", 60)
    st = eventually(lambda: (s := status_of(api, "FineTuneJob", running_job)).get("mlflowRunId") and s, what="MLflow run in status")
    assert st["rayJobId"] == f"{running_job}-x1" and st["dashboardURL"].endswith(":8265")
    assert st["mlflowRunId"].startswith(f"run-{running_job}-") and st["progress"] == "5/20 steps (25%)"
    assert waiter.poll() is None, "kubectl wait returned while the job was still running"
    kuberay_writes(api, running_job, jobStatus="SUCCEEDED", jobDeploymentStatus="Complete", endTime="2026-11-27T11:00:00Z")
    st = eventually(phase_is(api, running_job, "Succeeded"), what="Succeeded")
    assert st["completionTime"] == "2026-11-27T11:00:00Z"
    assert waitable(st) == {"Succeeded"}
    code, out = finished(waiter)  # the real `kubectl wait`, started while the job was running, returns
    assert code == 0 and f"finetunejob.llmplatform.io/{running_job} condition met" in out
    assert condition(st, "Succeeded")["reason"] == "JobSucceeded" and condition(st, "Succeeded")["lastTransitionTime"]
    st = eventually(lambda: (s := status_of(api, "FineTuneJob", running_job)).get("registeredVersion") and s, what="registered version in status")
    assert (st["registeredModel"], st["registeredVersion"], st["progress"]) == ("support-bot", "3", "20/20 steps (100%)")
    assert st["message"] == "training finished; registered support-bot version 3"
    # KubeRay then shuts the cluster down and the TTL deletes the RayJob: still Succeeded.
    api.delete("RayCluster", NS, f"{running_job}-raycluster-abc")
    api.delete("RayJob", NS, running_job)
    eventually(lambda: api.get("RayJob", NS, running_job) is None, what="RayJob gone")
    time.sleep(1.2)  # two health checks
    st = status_of(api, "FineTuneJob", running_job)
    assert st["phase"] == "Succeeded" and waitable(st) == {"Succeeded"}


@pytest.mark.parametrize("kuberay_status, reason, words", [
    ({"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed", "message": "Job has reached the specified backoff limit"}, "SubmissionFailed", "submitter pod failed"),
    ({"jobStatus": "FAILED", "jobDeploymentStatus": "Running", "message": "Job entrypoint command failed with exit code 1"}, "AppFailed", "exit code 1"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "message": "The RayJob has passed the activeDeadlineSeconds."}, "DeadlineExceeded", "activeDeadlineSeconds="),
], ids=["submitter-pod-failed", "job-failed-deployment-running", "deadline-exceeded"])
def test_kuberay_failure_modes_end_failed(api: KubeApi, running_job: str, kuberay_status: dict, reason: str, words: str, kubeconfig: str) -> None:
    waiter = kubectl_wait(kubeconfig, f"finetunejob/{running_job}", "Failed", 60)
    kuberay_writes(api, running_job, **kuberay_status)
    st = eventually(phase_is(api, running_job, "Failed"), what=f"Failed/{reason}")
    assert st["reason"] == reason and words in st["message"]
    assert st["completionTime"]
    assert waitable(st) == {"Failed"} and condition(st, "Failed")["reason"] == reason and words in condition(st, "Failed")["message"]
    assert finished(waiter)[0] == 0
    code, out = finished(kubectl_wait(kubeconfig, f"finetunejob/{running_job}", "Succeeded", 2))
    assert code != 0 and "timed out waiting for the condition" in out  # a failed job never satisfies Succeeded


def test_cluster_disappearing_mid_run_fails_the_job(api: KubeApi, running_job: str) -> None:
    api.delete("RayCluster", NS, f"{running_job}-raycluster-abc")  # KubeRay still says Running
    st = eventually(phase_is(api, running_job, "Failed"), what="ClusterLost")
    assert st["reason"] == "ClusterLost" and f"{running_job}-raycluster-abc" in st["message"]
    # how to resubmit, and that this job's checkpoints (pod-local by default) did not survive
    assert f"kubectl delete finetunejob {running_job} -n {NS}" in st["message"] and "starts from step 0" in st["message"]
    assert waitable(st) == {"Failed"} and condition(st, "Failed")["reason"] == "ClusterLost"


def test_resubmit_after_cluster_loss_reuses_the_run_name(api: KubeApi, running_job: str) -> None:
    """What the ClusterLost message tells the user to do (delete + apply the same manifest) gives the
    new RayJob the old job id: the same Ray Train run name, so training resumes from its checkpoints."""
    before = shlex.split(api.get("RayJob", NS, running_job)["spec"]["entrypoint"])
    api.delete("RayCluster", NS, f"{running_job}-raycluster-abc")
    eventually(phase_is(api, running_job, "Failed"), what="ClusterLost")
    api.delete("FineTuneJob", NS, running_job)
    eventually(lambda: api.get("FineTuneJob", NS, running_job) is None and api.get("RayJob", NS, running_job) is None, what="job and RayJob gone")
    api.create(ftj(running_job, uid=f"uid-{running_job}-again"))
    after = eventually(lambda: api.get("RayJob", NS, running_job), what="RayJob recreated")
    assert after["metadata"]["ownerReferences"][0]["uid"] == f"uid-{running_job}-again"
    job = shlex.split(after["spec"]["entrypoint"])[5:]
    assert job == before[5:] and job[1] == job_id(ftj(running_job))
    st = eventually(phase_is(api, running_job, "Pending"), what="the resubmitted job starts")
    assert waitable(st) == set() and condition(st, "Failed")["status"] == "False"


def test_rayjob_deleted_mid_run_fails_the_job(api: KubeApi, running_job: str) -> None:
    api.delete("RayJob", NS, running_job)
    st = eventually(phase_is(api, running_job, "Failed"), what="RayJobDeleted")
    assert st["reason"] == "RayJobDeleted" and waitable(st) == {"Failed"}


def test_cancel_marks_cancelled_and_removes_the_rayjob(api: KubeApi, running_job: str) -> None:
    row = cancel_finetune(running_job, namespace=NS, api=api)
    assert row["name"] == running_job
    st = eventually(phase_is(api, running_job, "Cancelled"), what="Cancelled")
    assert waitable(st) == set() and condition(st, "Running")["reason"] == "Cancelled"
    eventually(lambda: api.get("RayJob", NS, running_job) is None, what="RayJob deleted")


def test_deleting_the_finetunejob_removes_its_rayjob(api: KubeApi, running_job: str) -> None:
    api.delete("FineTuneJob", NS, running_job)
    eventually(lambda: api.get("RayJob", NS, running_job) is None, what="RayJob deleted")
    eventually(lambda: api.get("FineTuneJob", NS, running_job) is None, what="finalizer released")


def test_invalid_spec_is_a_permanent_error_in_status(api: KubeApi, cluster) -> None:
    bad = ftj(name="bad-job")
    bad["spec"]["lora"] = {"rank": 0}
    api.create(bad)
    st = eventually(phase_is(api, "bad-job", "Failed"), what="InvalidSpec")
    assert st["reason"] == "InvalidSpec" and "lora.rank" in st["message"]
    assert waitable(st) == {"Failed"} and "lora.rank" in condition(st, "Failed")["message"]
    assert api.get("RayJob", NS, "bad-job") is None


def test_adapter_change_patches_serve_config_in_place(api: KubeApi, cluster, fake_registry, request) -> None:
    name = unique(request, "md")
    fake_registry.aliases["models:/support-bot@production"] = "3"
    api.create(mdep(name, "models:/support-bot@production"))
    rs = eventually(lambda: api.get("RayService", NS, name), what="RayService created")
    cluster_before = rs["spec"]["rayClusterConfig"]
    [group] = cluster_before["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2  # tp=2
    assert "models:/support-bot/3" in rs["spec"]["serveConfigV2"]
    eventually(lambda: status_of(api, "ModelDeployment", name).get("resolvedRefs") == {"models:/support-bot@production": "3"}, what="resolved refs in status")

    # 1) the alias moves in the registry: the poll pins the new version, same cluster.
    fake_registry.aliases["models:/support-bot@production"] = "4"
    rs = eventually(lambda: (r := api.get("RayService", NS, name)) and "models:/support-bot/4" in r["spec"]["serveConfigV2"] and r, what="alias move applied")
    assert rs["spec"]["rayClusterConfig"] == cluster_before
    eventually(lambda: status_of(api, "ModelDeployment", name).get("servedVersion") == "support-bot/4", what="served version 4")

    # 2) the user points the adapter at another registered model.
    api.patch("ModelDeployment", NS, name, {"spec": {"model": {"adapters": [{"name": "support", "source": "models:/support-bot-v2/1"}]}}})
    rs = eventually(lambda: (r := api.get("RayService", NS, name)) and "models:/support-bot-v2/1" in r["spec"]["serveConfigV2"] and r, what="adapter change applied")
    assert rs["spec"]["rayClusterConfig"] == cluster_before
    patches = [r for r in cluster.requests_to("PATCH", f"/rayservices/{name}") if "/status" not in str(r.url)]
    assert len(patches) >= 2 and all(set(r.data["spec"]) == {"serveConfigV2"} for r in patches)
    assert [r.data["metadata"]["name"] for r in cluster.requests_to("POST", "/rayservices")].count(name) == 1
    assert not cluster.requests_to("DELETE", f"/rayservices/{name}")
    eventually(lambda: status_of(api, "ModelDeployment", name).get("servedVersion") == "support-bot-v2/1", what="served version in status")


def test_each_deployment_follows_its_alias_on_its_own_registry_poll_s(api: KubeApi, fake_registry, request) -> None:
    """ServeSpec.registry_poll_s is honoured on Kubernetes: the operator re-resolves each deployment's
    aliases on its own interval (it used to use one operator-wide env var for all)."""
    fast, slow = unique(request, "fast"), unique(request, "slow")
    fake_registry.aliases["models:/poll-bot@production"] = "1"
    api.create(mdep(fast, "models:/poll-bot@production", uid="uid-fast", registry_poll_s=1))
    api.create(mdep(slow, "models:/poll-bot@production", uid="uid-slow", registry_poll_s=3600))
    for name in (fast, slow):
        eventually(lambda n=name: (r := api.get("RayService", NS, n)) and "models:/poll-bot/1" in r["spec"]["serveConfigV2"], what=f"{name} on v1")
    fake_registry.aliases["models:/poll-bot@production"] = "2"
    eventually(lambda: "models:/poll-bot/2" in api.get("RayService", NS, fast)["spec"]["serveConfigV2"], timeout=8, what="fast follows within seconds")
    time.sleep(2.0)  # several more registry ticks (0.5 s each in this harness)
    assert "models:/poll-bot/1" in api.get("RayService", NS, slow)["spec"]["serveConfigV2"], "the hourly deployment waits for its own interval"


def test_rayservice_readiness_is_mirrored(api: KubeApi, fake_registry, request, kubeconfig: str) -> None:
    name = unique(request, "md")
    api.create(mdep(name, "models:/support-bot/7"))
    eventually(lambda: api.get("RayService", NS, name), what="RayService created")
    waiter = kubectl_wait(kubeconfig, f"modeldeployment/{name}", "Ready", 60)
    time.sleep(1.0)
    assert waiter.poll() is None, "kubectl wait returned before the deployment was ready"
    api.patch_status("RayService", NS, name, {"serviceStatus": "Running", "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"}]})
    st = eventually(lambda: (s := status_of(api, "ModelDeployment", name)).get("phase") == "Ready" and s, what="Ready")
    assert st["endpoint"] == f"http://{name}-serve-svc.team-a.svc:8000"
    assert waitable(st) == {"Ready"}
    code, out = finished(waiter)
    assert code == 0 and f"modeldeployment.llmplatform.io/{name} condition met" in out
    assert [c["type"] for c in st["conditions"]] == ["Ready", "Progressing", "Degraded"]
    api.patch_status("RayService", NS, name, {"serviceStatus": "", "conditions": [{"type": "Ready", "status": "False", "reason": "ServeDeploymentUnhealthy", "message": "replica crashed"}]})
    st = eventually(lambda: (s := status_of(api, "ModelDeployment", name)).get("phase") == "Unhealthy" and s, what="Unhealthy")
    assert waitable(st) == {"Degraded"} and condition(st, "Degraded")["message"] == "replica crashed"


def test_registry_outage_retries_instead_of_failing(api: KubeApi, fake_registry, request) -> None:
    name = unique(request, "md")
    api.create(mdep(name, "models:/flaky-bot@production"))  # alias unknown: TemporaryError, retried
    time.sleep(1.0)
    assert api.get("RayService", NS, name) is None
    assert status_of(api, "ModelDeployment", name).get("phase") != "Failed"
    fake_registry.aliases["models:/flaky-bot@production"] = "1"
    rs = eventually(lambda: api.get("RayService", NS, name), timeout=15, what="RayService after retry")
    assert "models:/flaky-bot/1" in rs["spec"]["serveConfigV2"]


def test_shipped_deployment_with_auth_gets_the_api_key_secret_and_its_file_in_the_plan(api: KubeApi, fake_registry, manifest_validator, request) -> None:
    """jobs/k8s/deployment-70b-tp.yaml turns auth on: its RayService's pods (head and workers: the
    ingress replica may land on either) mount the API-key Secret, and the serve plan in
    serveConfigV2 tells the ingress to read the mounted file (no env var needed on Kubernetes)."""
    from pathlib import Path

    import yaml

    from llmplatform.resolve import Resolved

    cr = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "k8s" / "deployment-70b-tp.yaml").read_text())
    name = unique(request, "auth")
    cr["metadata"].update(name=name, namespace=NS)
    cr["spec"]["engine"] = "auto"  # this test operator's image has no vLLM (LLMOP_IMAGE_HAS_VLLM unset)
    fake_registry.aliases[cr["spec"]["model"]["registry"]] = "5"
    api.create(cr)
    rs = eventually(lambda: api.get("RayService", NS, name), what="RayService created")
    manifest_validator.validate(rs)
    config = rs["spec"]["rayClusterConfig"]
    for pod in [config["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in config["workerGroupSpecs"]]:
        assert {"name": "api-keys", "secret": {"secretName": "llm-platform-api-keys", "items": [{"key": "keys", "path": "keys"}]}} in pod["volumes"]
        assert {"name": "api-keys", "mountPath": "/etc/llm-platform/api-keys", "readOnly": True} in pod["containers"][0]["volumeMounts"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "llm-platform-hf-token", "key": "token", "optional": True}
    [app] = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    plan = Resolved.from_dict(app["args"])
    assert plan.spec.auth.enabled and plan["api_keys_file"] == "/etc/llm-platform/api-keys/keys"
