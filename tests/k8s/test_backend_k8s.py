"""`--target k8s` client functions against kmock's in-memory API (no operator running)."""

from __future__ import annotations

import pytest

from llmplatform import kube
from llmplatform.backends import k8s
from llmplatform.errors import JobError
from llmplatform.specs import load_spec, parse_spec

from k8s_harness import REPO

NS = "team-b"


@pytest.fixture()
def api(cluster) -> kube.KubeApi:
    return kube.connect(host=cluster.url)


def spec(name: str, **extra):
    return parse_spec("finetune", {"name": name, "base_model": "llama2-tiny", "data": {"train": "s3://b/t.jsonl"}, **extra})


def test_builders_emit_only_what_the_user_set_and_validate(manifest_validator) -> None:
    cr = k8s.finetune_job_cr(spec("only-set", lora={"rank": 8}), NS)
    assert cr["metadata"] == {"name": "only-set", "namespace": NS, "labels": {"app.kubernetes.io/part-of": "llm-platform"}}
    assert cr["spec"] == {"base_model": "llama2-tiny", "data": {"train": "s3://b/t.jsonl"}, "lora": {"rank": 8}}
    manifest_validator.validate(cr)
    for path in sorted((REPO / "jobs" / "serve").glob("*.yaml")):
        manifest_validator.validate(k8s.model_deployment_cr(load_spec(path, "serve"), NS))
    for path in sorted((REPO / "jobs" / "finetune").glob("*.yaml")):
        manifest_validator.validate(k8s.finetune_job_cr(load_spec(path, "finetune"), NS))


def test_submit_list_status_cancel(api: kube.KubeApi) -> None:
    created = k8s.submit_finetune(spec("job-one"), namespace=NS, api=api)
    assert (created["name"], created["namespace"], created["phase"]) == ("job-one", NS, "Pending")
    with pytest.raises(JobError, match="already exists; pick a new `name`"):
        k8s.submit_finetune(spec("job-one"), namespace=NS, api=api)
    api.patch_status("FineTuneJob", NS, "job-one", {"phase": "Running", "progress": "10/100 steps (10%)", "rayJobName": "job-one"})
    rows = k8s.list_finetunes(namespace=NS, api=api)
    assert [(r["name"], r["phase"], r["progress"]) for r in rows] == [("job-one", "Running", "10/100 steps (10%)")]
    row = k8s.cancel_finetune("job-one", namespace=NS, api=api)
    assert row["name"] == "job-one"
    assert api.get("FineTuneJob", NS, "job-one")["metadata"]["annotations"][k8s.CANCEL_ANNOTATION] == "true"
    with pytest.raises(JobError, match="no FineTuneJob team-b/nope"):
        k8s.get_finetune("nope", namespace=NS, api=api)


def test_deploy_creates_then_updates_in_place(api: kube.KubeApi) -> None:
    first = parse_spec("serve", {"name": "bot", "model": {"base": "llama2-tiny", "adapters": [{"name": "a", "source": "models:/a/1"}]}, "engine": "hf"})
    assert k8s.apply_deployment(first, namespace=NS, api=api)["action"] == "created"
    second = parse_spec("serve", {"name": "bot", "model": {"base": "llama2-tiny", "adapters": [{"name": "a", "source": "models:/a/2"}]}})
    assert k8s.apply_deployment(second, namespace=NS, api=api)["action"] == "updated"
    live = api.get("ModelDeployment", NS, "bot")
    assert live["spec"]["model"]["adapters"] == [{"name": "a", "source": "models:/a/2"}]
    assert "engine" not in live["spec"]  # removed in the new spec: removed on the cluster too


def test_logs_come_from_the_submitter_pod(api: kube.KubeApi, cluster) -> None:
    k8s.submit_finetune(spec("job-logs"), namespace=NS, api=api)
    api.patch_status("FineTuneJob", NS, "job-logs", {"phase": "Running", "rayJobName": "job-logs"})
    import kubernetes

    core = kubernetes.client.CoreV1Api(kube.api_client(host=cluster.url))
    core.create_namespaced_pod(NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job-logs-abcde", "namespace": NS, "labels": {"job-name": "job-logs"}},
                                    "spec": {"containers": [{"name": "ray-job-submitter", "image": "x"}]}})
    cluster.emulator[f"get /api/v1/namespaces/{NS}/pods/job-logs-abcde/log"] << "step 10 loss 1.23\n"
    assert "".join(k8s.finetune_logs("job-logs", namespace=NS, api=api)) == "step 10 loss 1.23\n"


def test_kubeconfig_errors_name_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(JobError, match="--kubeconfig/--context or set KUBECONFIG"):
        kube.connect(kubeconfig=str(tmp_path / "missing"))
    monkeypatch.setenv("PLATFORM_K8S_NAMESPACE", "from-env")
    assert k8s.default_namespace() == "from-env" and k8s.default_namespace("flag") == "flag"
