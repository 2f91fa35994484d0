"""A GPU ModelDeployment executed up to the point where CUDA is needed (issue 15).

The operator runs as for the GPU image (LLMOP_IMAGE_HAS_VLLM: engine auto -> vllm); the harness
starts a local Ray cluster whose worker declares the pod's 2 `nvidia.com/gpu` as Ray GPUs and
deploys the serveConfigV2. There is no vLLM and no CUDA here, so the replica fails when it builds
its engine; before that, Ray and Serve have placed it, and the test reads from their own state
what it was told: the placement group of TP x 1-GPU bundles, the engine and TP degree of the plan
it was built with, its env. Then the ModelDeployment is deleted and nothing is left.
"""

from __future__ import annotations

import json
import time

import pytest

from llmplatform.backends.k8s import model_deployment_cr
from llmplatform.kube import KubeApi, connect
from llmplatform.specs import parse_spec

from k8s_harness import OperatorThread, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

NS = "serve-gpu"
NAME = "tp2"


@pytest.fixture(scope="module")
def api(cluster) -> KubeApi:
    return connect(host=cluster.url)


@pytest.fixture(scope="module")
def gpu_operator(cluster):
    from llmoperator.handlers import Deps
    from llmoperator.reconcile.common import OperatorConfig

    deps = Deps(api=connect(host=cluster.url), cfg=OperatorConfig(image="registry.example/llm-platform:gpu", image_has_vllm=True),
                check_interval_s=1.0, registry_poll_s=5.0, retry_delay_s=0.5)
    with OperatorThread(cluster.url, deps) as op:
        yield op


@pytest.fixture(scope="module")
def kuberay(api, gpu_operator, tmp_path_factory):
    from kuberay_serve import KubeRayServe

    with KubeRayServe(api, NS, tmp_path_factory.mktemp("kuberay-serve-gpu")) as k:
        yield k
    assert not k.errors, f"the harness hit errors: {k.errors[-3:]}"


def state_api(local, path: str):
    """GET on the head's dashboard (state API), with the cluster's token."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(local.dashboard_url + path, headers=local.auth_headers()), timeout=10) as resp:
        return json.loads(resp.read())


def test_tp2_gpu_replica_is_told_its_placement_engine_and_env(api: KubeApi, kuberay, mlflow_server) -> None:
    from kuberay_serve import dashboard_call, put_secret

    put_secret(api, NS, "llm-platform-mlflow", {"tracking-uri": mlflow_server})
    spec = parse_spec("serve", {"name": NAME, "model": {"base": "llama2-tiny-random"}, "max_model_len": 256,
                                "tensor_parallel": 2, "resources": {"gpus_per_shard": 1}})
    api.create(model_deployment_cr(spec, NS))
    local = eventually(lambda: (kuberay.state(NAME) and kuberay.state(NAME).pending or None), timeout=120, what="cluster started").local
    # the worker pod's 2 nvidia.com/gpu are Ray GPUs of its raylet
    assert [n.resources.get("num_gpus") for n in local.nodes] == [0, 2]

    def failed_for_lack_of_vllm():
        apps = dashboard_call(local, "GET").get("applications") or {}
        dep = ((apps.get(NAME) or {}).get("deployments") or {}).get("ingress") or {}
        return (apps[NAME], dep) if "vllm" in (dep.get("message") or "") else None

    app, dep = eventually(failed_for_lack_of_vllm, timeout=180, what="the replica to reach its engine")
    # the plan the replica was built with (Serve's record of the deployed config): engine, TP
    values = app["deployed_app_config"]["args"]["values"]
    assert values["engine"]["value"] == "vllm" and values["tensor_parallel"]["value"] == 2
    assert values["topology"]["value"] == "colocated"
    # Ray's own state: the replica's placement group, 2 bundles of {CPU 1, GPU 1} packed on the GPU worker
    # Serve retries the failing replica, each try with a new group: between a try's removal and the next's
    # creation none is CREATED (CI, 2026-12-05: one REMOVED, one PENDING), so wait for a try that holds one
    def created_groups():
        pgs = state_api(local, "/api/v0/placement_groups?detail=1&limit=100")["data"]["result"]["result"]
        placed = [pg for pg in pgs if pg["name"].startswith(f"SERVE_REPLICA::{NAME}#ingress#") and pg["state"] == "CREATED"]
        assert placed, f"no created placement group of the replica: {[(pg['name'], pg['state']) for pg in pgs]}"
        return placed

    placed = eventually(created_groups, timeout=60, what="a created placement group of the replica")
    bundles = placed[0]["bundles"]
    assert [b["unit_resources"] for b in bundles] == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    gpu_node = next(n for n in state_api(local, "/api/v0/nodes?limit=100")["data"]["result"]["result"] if n["resources_total"].get("GPU"))
    assert {b["node_id"] for b in bundles} == {gpu_node["node_id"]}  # STRICT_PACK, on the node with the GPUs
    # its env: the pod's (PLATFORM_HOME in the pod's home, the MLflow URI from the llm-platform-mlflow Secret)
    env = dep["deployment_config"]["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == mlflow_server
    assert env["PLATFORM_HOME"].startswith(str(kuberay.workdir)) and env["PLATFORM_HOME"].endswith("/home/.llm-platform")
    # and it got as far as building the vLLM engine with the plan's TP degree: the import fails before any CUDA call
    assert "VLLMEngine(" in dep["message"] and "No module named 'vllm'" in dep["message"]
    md = api.get("ModelDeployment", NS, NAME)["status"]
    assert md["phase"] in ("Deploying", "Pending") and md["servedVersion"] == "llama2-tiny-random"

    clusters = list(kuberay.state(NAME).history)
    api.delete("ModelDeployment", NS, NAME)
    eventually(lambda: NAME in kuberay.stopped, timeout=120, what="the harness tore the RayService down")
    for c in clusters:
        assert not c.local.alive() and not c.local.pids(), f"cluster {c.name} left processes"
