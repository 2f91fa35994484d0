"""Fixtures for tests/k8s (the harness itself is in k8s_harness.py)."""

from __future__ import annotations

import pytest

from k8s_harness import FakeRegistry, InMemoryCluster, ManifestValidator, OperatorThread


@pytest.fixture(scope="session")
def manifest_validator() -> ManifestValidator:
    return ManifestValidator()


# ---------------------------------------------------------------------------- in-memory API + operator


# One API server and one operator per test module (kopf takes seconds to stop); tests use
# distinct object names so they don't see each other.
# A module that polls for minutes (the KubeRay-harness flows) sets KMOCK_KEEP_REQUESTS to cap kmock's request log.
@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest):
    with InMemoryCluster(keep_requests=getattr(request.module, "KMOCK_KEEP_REQUESTS", None)) as c:
        yield c


@pytest.fixture(scope="module")
def fake_registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture(scope="module")
def operator(cluster: InMemoryCluster, fake_registry: FakeRegistry):
    from llmplatform.kube import connect

    from llmoperator.handlers import Deps
    from llmoperator.reconcile.common import OperatorConfig

    from llmoperator.reconcile.finetune import job_id

    def progress(body: dict) -> dict:  # stands in for the MLflow lookup of the job's run
        if (body.get("status") or {}).get("phase") == "Succeeded":  # the finished run registered its adapter
            return {"mlflowRunId": f"run-{job_id(body)}", "progress": "20/20 steps (100%)", "registeredModel": "support-bot", "registeredVersion": "3"}
        return {"mlflowRunId": f"run-{job_id(body)}", "progress": "5/20 steps (25%)"}

    def eval_results(body: dict) -> dict | None:  # stands in for the MLflow lookup of an evaluation's runs
        from llmoperator.reconcile.evaluation import job_id as eval_job_id

        return {"results": [{"model": m, "runId": f"run-{eval_job_id(body)}-{i}", "status": "FINISHED", "metrics": {"exact_match": 0.5 + i / 4}}
                            for i, m in enumerate(body["spec"]["models"])]}

    deps = Deps(api=connect(host=cluster.url), cfg=OperatorConfig(image="registry.example/llm-platform:test"),
                resolve_version=fake_registry, job_progress=progress, eval_results=eval_results, check_interval_s=0.5, registry_poll_s=0.5,
                retry_delay_s=0.25)
    with OperatorThread(cluster.url, deps) as op:
        yield op


# ---------------------------------------------------------------------------- the operator against real MLflow + KubeRay played locally


@pytest.fixture(scope="module")
def operator_mlflow(cluster: InMemoryCluster, mlflow_server: str):
    """The operator as `python -m llmoperator` wires it (real MLflow registry lookup and job progress,
    MLFLOW_TRACKING_URI in its env), against this module's kmock; the Secret `llm-platform-mlflow`
    (key tracking-uri) that the Ray pods read is created in the namespaces the tests use.
    KubeRay's TTL is 30 s, so a finished job's cluster stays up a little, as on a cluster."""
    import base64

    from kubernetes import client

    from llmplatform.kube import connect

    from kuberay_jobs import HF_TEST_TOKEN, KUBERAY_NAMESPACES
    from llmoperator.__main__ import mlflow_eval_results, mlflow_job_progress, registry_lookup
    from llmoperator.handlers import Deps
    from llmoperator.reconcile.common import OperatorConfig

    api = connect(host=cluster.url)
    core = client.CoreV1Api(api._client)
    for ns in KUBERAY_NAMESPACES:
        core.create_namespaced_secret(ns, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm-platform-mlflow", "namespace": ns},
                                           "data": {"tracking-uri": base64.b64encode(mlflow_server.encode()).decode()}})
        # the Hugging Face token Secret the operator's pods may reference (OperatorConfig.hf_token_secret)
        core.create_namespaced_secret(ns, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm-platform-hf-token", "namespace": ns},
                                           "data": {"token": base64.b64encode(HF_TEST_TOKEN.encode()).decode()}})
    deps = Deps(api=api, cfg=OperatorConfig(image="registry.example/llm-platform:test", ttl_seconds_after_finished=30),
                resolve_version=registry_lookup, job_progress=mlflow_job_progress, eval_results=mlflow_eval_results, check_interval_s=1.0,
                registry_poll_s=1.0, retry_delay_s=0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        with OperatorThread(cluster.url, deps) as op:
            yield op


@pytest.fixture(scope="module")
def rayjobs(cluster: InMemoryCluster, tmp_path_factory: pytest.TempPathFactory):
    """KubeRay's RayJob controller played with real local Ray clusters (kuberay_jobs.py)."""
    from kuberay_jobs import KUBERAY_NAMESPACES, RayJobHarness

    with RayJobHarness(cluster.url, tmp_path_factory.mktemp("kuberay"), namespaces=KUBERAY_NAMESPACES) as harness:
        yield harness
