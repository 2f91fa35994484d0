"""`--target k8s` client functions against kmock's in-memory API (no operator running)."""

from __future__ import annotations

import pytest

from llmplatform import kube
from llmplatform.backends import k8s
from llmplatform.errors import JobError, ServeError
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
    with pytest.raises(JobError, match=r"already exists\. To resubmit it .*`kubectl delete finetunejob job-one -n team-b`"):
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


def _write_kubeconfig(path, server: str, current: str | None, contexts: dict[str, str | None]) -> str:
    import yaml

    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", **({"current-context": current} if current else {}),
        "clusters": [{"name": "c", "cluster": {"server": server}}], "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": n, "context": {"cluster": "c", "user": "u", **({"namespace": ns} if ns else {})}} for n, ns in contexts.items()],
    }))
    return str(path)


def test_namespace_defaults_to_the_kubeconfig_contexts_like_kubectl(tmp_path, monkeypatch, cluster) -> None:
    for var in ("PLATFORM_K8S_NAMESPACE", "PLATFORM_K8S_CONTEXT", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    first = _write_kubeconfig(tmp_path / "a", cluster.url, "ctx-a", {"ctx-a": "team-a", "bare": None})
    second = _write_kubeconfig(tmp_path / "b", cluster.url, None, {"ctx-b": "team-b"})
    assert k8s.default_namespace(kubeconfig=first) == "team-a"
    assert k8s.default_namespace(kubeconfig=first, context="bare") == "default"  # a context without a namespace
    assert k8s.default_namespace("flag", kubeconfig=first) == "flag"
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")  # a list is merged, as the client that connects merges it
    assert k8s.default_namespace() == "team-a"
    assert kube.api_client().configuration.host == cluster.url
    monkeypatch.setenv("PLATFORM_K8S_CONTEXT", "ctx-b")
    assert k8s.default_namespace() == "team-b"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("PLATFORM_K8S_CONTEXT")
    assert k8s.default_namespace() == "default"  # connecting reports the missing file with the fix

    sa = tmp_path / "namespace"  # in a pod: the service account's namespace
    sa.write_text("team-pod\n")
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_NAMESPACE_FILE", str(sa))
    assert k8s.default_namespace() == "team-pod"


def test_submit_waits_for_the_operator_and_says_when_none_watches(api: kube.KubeApi) -> None:
    import time

    started = time.monotonic()
    with pytest.raises(k8s.NoOperatorError) as err:  # no operator runs in this module
        k8s.submit_finetune(spec("job-orphan"), namespace=NS, api=api, operator_timeout_s=1.0)
    assert 1.0 <= time.monotonic() - started < 5
    assert "no llm-platform operator has picked up FineTuneJob team-b/job-orphan (no status after 1s)" in str(err.value)
    assert "`kubectl delete finetunejob job-orphan -n team-b`" in str(err.value)
    # What the operator writes first is enough (a job it refused, too): the same call returns at once.
    k8s.submit_finetune(spec("job-seen"), namespace=NS, api=api)
    api.patch_status("FineTuneJob", NS, "job-seen", {"phase": "Failed", "reason": "InvalidSpec", "message": "x"})
    assert k8s.wait_for_operator(api, "FineTuneJob", NS, "job-seen", 1.0)["status"]["phase"] == "Failed"


def test_picked_up_follows_observed_generation() -> None:
    cr = {"metadata": {"generation": 2}, "status": {"phase": "Ready", "observedGeneration": 1}}
    assert not k8s.picked_up(cr, before={"phase": "Ready", "observedGeneration": 1})  # an update not seen yet
    assert k8s.picked_up({**cr, "status": {"phase": "Ready", "observedGeneration": 2}}, before={"phase": "Ready", "observedGeneration": 1})
    assert not k8s.picked_up({"metadata": {"generation": 1}})
    assert k8s.picked_up({"metadata": {"generation": 1}, "status": {"phase": "Pending", "observedGeneration": 1}})


def test_chat_url_is_the_endpoint_or_the_port_forward_override() -> None:
    row = k8s.deployment_row({"metadata": {"name": "bot", "namespace": NS}, "spec": {},
                              "status": {"phase": "Ready", "endpoint": "http://bot-serve-svc.team-b.svc:8000", "rayServiceName": "bot"}})
    assert k8s.chat_base_url(row) == "http://bot-serve-svc.team-b.svc:8000/v1"
    assert k8s.chat_base_url(row, "http://127.0.0.1:8000/") == "http://127.0.0.1:8000/v1"
    assert k8s.chat_base_url(row, "http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    prefixed = {**row, "route_prefix": "/bot"}
    assert k8s.chat_base_url(prefixed, "http://127.0.0.1:9000") == "http://127.0.0.1:9000/bot/v1"
    assert "kubectl port-forward -n team-b svc/bot-serve-svc 8000:8000" in k8s.port_forward_hint(row)
    with pytest.raises(ServeError, match="has no endpoint yet .*pass --url"):
        k8s.chat_base_url({**row, "endpoint": None, "phase": "Pending"})
