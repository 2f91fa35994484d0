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
@pytest.fixture(scope="module")
def cluster():
    with InMemoryCluster() as c:
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

    deps = Deps(api=connect(host=cluster.url), cfg=OperatorConfig(image="registry.example/llm-platform:test"),
                resolve_version=fake_registry, job_progress=progress, check_interval_s=0.5, registry_poll_s=0.5, retry_delay_s=0.25)
    with OperatorThread(cluster.url, deps) as op:
        yield op
