"""status.conditions on our CRs: what `kubectl wait --for=condition=X` and Argo CD read.

The objects here come from the operator's own status code (`reconcile.status`: KubeRay status ->
phase -> conditions), and the Argo CD health checks are the shipped .lua files, executed with a
real Lua 5.1 (lupa; Argo CD embeds gopher-lua, a Lua 5.1). The kmock operator tests assert the same
conditions end to end (tests/k8s/test_operator_kmock.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k8s_harness import REPO

from llmoperator import crdgen
from llmoperator.reconcile import status

NOW, LATER = "2026-11-27T12:00:00Z", "2026-11-27T12:05:00Z"
HEALTH = REPO / "manifests" / "argocd" / "health"
CONDITION_KEYS = {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}


def kubectl_wait_satisfied(obj: dict, ctype: str) -> bool:
    """What `kubectl wait --for=condition=TYPE` checks: a condition of that type with status "True"."""
    return any(c["type"] == ctype and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions") or [])


def apply(kind: str, obj: dict, fields: dict, now: str = NOW) -> dict:
    """`obj` after the operator's status write for `fields` (the merge patch `_set_status` sends)."""
    patch = status.with_conditions(kind, obj.get("status"), fields, obj["metadata"]["generation"], now)
    return {**obj, "status": {**(obj.get("status") or {}), **patch}}


def ftj(generation: int = 1) -> dict:
    return {"apiVersion": "llmplatform.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "job-a", "namespace": "ns", "generation": generation},
            "spec": {"base_model": "llama2-7b", "data": {"train": "s3://b/train.jsonl"}}}


def mdep(generation: int = 1) -> dict:
    return {"apiVersion": "llmplatform.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": "ns", "generation": generation},
            "spec": {"model": {"base": "llama2-7b-chat"}}}


def rayjob(**st) -> dict:
    return {"metadata": {"name": "job-a"}, "spec": {"activeDeadlineSeconds": 3600}, "status": st}


def rayservice(conditions: list, service_status: str = "") -> dict:
    return {"metadata": {"name": "chat", "namespace": "ns"}, "status": {"conditions": conditions, "serviceStatus": service_status}}


def job_through(*kuberay: dict, cluster_gone: bool = False) -> dict:
    """A FineTuneJob after the operator created its RayJob and mirrored each KubeRay status in turn."""
    obj = apply("FineTuneJob", ftj(), {"phase": "Pending", "reason": "Submitted", "message": "RayJob created; waiting for KubeRay",
                                       "rayJobName": "job-a", "observedGeneration": 1})
    for st in kuberay:
        obj = apply("FineTuneJob", obj, status.finetune_status(rayjob(**st), obj["status"], NOW, cluster_gone=cluster_gone))
    return obj


RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "rc-1"}
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": NOW}
FAILED = {"jobDeploymentStatus": "Running", "jobStatus": "FAILED", "message": "exit code 1"}
STOPPED = {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}
READY = [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"}]
UNHEALTHY = [{"type": "Ready", "status": "False", "reason": "ServeDeploymentUnhealthy", "message": "replica crashed"}]


def deployment_through(*rayservices: dict | None) -> dict:
    obj = apply("ModelDeployment", mdep(), {"phase": "Deploying", "reason": "Created", "message": "RayService created", "observedGeneration": 1})
    for rs in rayservices:
        obj = apply("ModelDeployment", obj, status.deployment_status(rs, obj["status"], NOW))
    return obj


# ---------------------------------------------------------------------------- kubectl wait


@pytest.mark.parametrize("kuberay, true_types", [
    ((), set()),
    (({"jobDeploymentStatus": "Initializing"},), set()),
    ((RUNNING,), {"Running"}),
    ((RUNNING, SUCCEEDED), {"Succeeded"}),
    ((RUNNING, FAILED), {"Failed"}),
    ((RUNNING, STOPPED), set()),
], ids=["pending", "initializing", "running", "succeeded", "failed", "cancelled"])
def test_finetunejob_conditions_answer_kubectl_wait(kuberay: tuple, true_types: set) -> None:
    obj = job_through(*kuberay)
    conditions = obj["status"]["conditions"]
    assert [c["type"] for c in conditions] == ["Running", "Succeeded", "Failed"]  # always all three
    assert all(set(c) == CONDITION_KEYS and c["observedGeneration"] == 1 and c["reason"] and c["message"] for c in conditions)
    assert {t for t in ("Running", "Succeeded", "Failed") if kubectl_wait_satisfied(obj, t)} == true_types


def test_cluster_loss_is_failed_true_with_the_reason() -> None:
    obj = job_through(RUNNING, RUNNING, cluster_gone=True)
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert kubectl_wait_satisfied(obj, "Failed") and not kubectl_wait_satisfied(obj, "Running")
    assert failed["reason"] == "ClusterLost" and "rc-1" in failed["message"]


@pytest.mark.parametrize("rayservices, true_types", [
    ((), {"Progressing"}),
    ((rayservice([]),), {"Progressing"}),
    ((rayservice(READY),), {"Ready"}),
    ((rayservice(READY), rayservice(READY + [{"type": "UpgradeInProgress", "status": "True"}])), {"Ready", "Progressing"}),
    ((rayservice([]), rayservice([{"type": "UpgradeInProgress", "status": "True"}])), {"Progressing"}),
    ((rayservice(READY), rayservice(UNHEALTHY)), {"Degraded"}),
], ids=["created", "deploying", "ready", "updating-while-serving", "updating-before-ready", "unhealthy"])
def test_modeldeployment_conditions_answer_kubectl_wait(rayservices: tuple, true_types: set) -> None:
    obj = deployment_through(*rayservices)
    assert [c["type"] for c in obj["status"]["conditions"]] == ["Ready", "Progressing", "Degraded"]
    assert {t for t in ("Ready", "Progressing", "Degraded") if kubectl_wait_satisfied(obj, t)} == true_types


def test_invalid_spec_degrades_a_deployment_and_fails_a_job() -> None:
    invalid = {"phase": "Failed", "reason": "InvalidSpec", "message": "spec.tensor_parallel: must be >= 1"}  # what handlers._permanent writes
    md = apply("ModelDeployment", mdep(), invalid)
    assert kubectl_wait_satisfied(md, "Degraded") and not kubectl_wait_satisfied(md, "Ready")
    job = apply("FineTuneJob", ftj(), invalid)
    assert kubectl_wait_satisfied(job, "Failed")
    assert next(c for c in job["status"]["conditions"] if c["type"] == "Failed")["message"] == invalid["message"]


def test_last_transition_time_moves_only_when_a_condition_flips() -> None:
    obj = job_through(RUNNING)
    assert {c["lastTransitionTime"] for c in obj["status"]["conditions"]} == {NOW}
    # progress and the same phase again: nothing to write, so the conditions keep their times
    assert status.with_conditions("FineTuneJob", obj["status"], {"progress": "5/20 steps (25%)"}, 1, LATER) == {"progress": "5/20 steps (25%)"}
    done = apply("FineTuneJob", obj, status.finetune_status(rayjob(**SUCCEEDED), obj["status"], LATER), now=LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in done["status"]["conditions"]}
    assert times == {"Running": LATER, "Succeeded": LATER, "Failed": NOW}  # Failed stayed False since NOW
    failed = next(c for c in done["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "JobSucceeded"  # reason/message follow the phase even without a flip


def test_observed_generation_is_the_one_the_operator_applied() -> None:
    obj = deployment_through(rayservice(READY))
    edited = {**obj, "metadata": {**obj["metadata"], "generation": 2}}  # spec edited; the RayService event comes first
    mirrored = apply("ModelDeployment", edited, status.deployment_status(rayservice(READY), edited["status"], LATER), now=LATER)
    assert {c["observedGeneration"] for c in mirrored["status"]["conditions"]} == {1}
    reconciled = apply("ModelDeployment", mirrored, {"observedGeneration": 2, "message": "Serve config updated in place (same Ray cluster)"}, now=LATER)
    assert {c["observedGeneration"] for c in reconciled["status"]["conditions"]} == {2}


@pytest.mark.parametrize("kind", list(crdgen.KINDS))
def test_every_crd_status_has_metav1_conditions(kind: str, manifest_validator) -> None:
    crd = yaml.safe_load((REPO / "manifests" / "crds" / crdgen.filename(kind)).read_text())
    conditions = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["type"] == "array" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["properties"]) == CONDITION_KEYS
    assert set(conditions["items"]["required"]) == CONDITION_KEYS - {"observedGeneration"}  # as metav1.Condition
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    obj = job_through(RUNNING, FAILED) if kind == "FineTuneJob" else deployment_through(rayservice(READY))
    manifest_validator.validate(obj)  # the operator's status passes the CRD's schema


# ---------------------------------------------------------------------------- Argo CD health


def argo_health(kind: str, obj: dict) -> dict:
    """Run the shipped health check as Argo CD does: `obj` a global table, the script's return value."""
    from lupa.lua51 import LuaRuntime

    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute((HEALTH / f"llmplatform.io_{kind}.lua").read_text())
    return {"status": hs["status"], "message": hs["message"]}


@pytest.mark.parametrize("kuberay, health", [
    ((), "Progressing"),
    ((RUNNING,), "Progressing"),
    ((RUNNING, SUCCEEDED), "Healthy"),
    ((RUNNING, FAILED), "Degraded"),
    ((RUNNING, STOPPED), "Suspended"),
], ids=["pending", "running", "succeeded", "failed", "cancelled"])
def test_argocd_health_of_finetunejobs(kuberay: tuple, health: str) -> None:
    obj = job_through(*kuberay)
    hs = argo_health("FineTuneJob", obj)
    assert hs["status"] == health
    if health == "Degraded":
        assert hs["message"].startswith("AppFailed: ") and "exit code 1" in hs["message"]


def test_argocd_health_before_the_operator_wrote_status() -> None:
    assert argo_health("FineTuneJob", ftj())["status"] == "Progressing"
    assert argo_health("ModelDeployment", mdep())["status"] == "Progressing"
    running = job_through(RUNNING)
    running["status"]["progress"] = "5/20 steps (25%)"
    assert argo_health("FineTuneJob", running) == {"status": "Progressing", "message": "training (5/20 steps (25%))"}


@pytest.mark.parametrize("rayservices, health", [
    ((), "Progressing"),
    ((rayservice([]),), "Progressing"),
    ((rayservice(READY),), "Healthy"),
    ((rayservice(READY), rayservice(READY + [{"type": "UpgradeInProgress", "status": "True"}])), "Progressing"),
    ((rayservice(READY), rayservice(UNHEALTHY)), "Degraded"),
], ids=["created", "deploying", "ready", "updating", "unhealthy"])
def test_argocd_health_of_modeldeployments(rayservices: tuple, health: str) -> None:
    assert argo_health("ModelDeployment", deployment_through(*rayservices))["status"] == health


def test_argocd_health_of_failed_and_not_yet_reconciled_deployments() -> None:
    failed = apply("ModelDeployment", mdep(), {"phase": "Failed", "reason": "InvalidSpec", "message": "spec.tensor_parallel: must be >= 1"})
    assert argo_health("ModelDeployment", failed) == {"status": "Degraded", "message": "InvalidSpec: spec.tensor_parallel: must be >= 1"}
    ready = deployment_through(rayservice(READY))
    edited = {**ready, "metadata": {**ready["metadata"], "generation": 2}}  # the operator hasn't applied the edit yet
    assert argo_health("ModelDeployment", edited)["status"] == "Progressing"


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_argocd_cm_embeds_exactly_the_shipped_health_checks(env: str) -> None:
    from test_manifests import kustomize

    [cm] = [o for o in kustomize(f"manifests/clusters/{env}") if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["name"] == "argocd-cm" and cm["metadata"]["namespace"] == "argocd"
    assert cm["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"
    shipped = {f"resource.customizations.health.{p.stem}": p.read_text() for p in sorted(HEALTH.glob("*.lua"))}
    assert set(shipped) == {f"resource.customizations.health.{crdgen.GROUP}_{kind}" for kind in crdgen.KINDS}
    assert cm["data"] == shipped
