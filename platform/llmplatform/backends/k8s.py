"""`--target k8s`: FineTuneJob and ModelDeployment custom resources.

Pure builders `finetune_job_cr(spec, namespace)` / `model_deployment_cr(spec, namespace)` turn
specs into CRs (the operator does the rest). The CLI functions below talk to the API server
through `llmplatform.kube` (the client the operator uses too); they take
kubeconfig/context/namespace, falling back to KUBECONFIG, PLATFORM_K8S_CONTEXT and
PLATFORM_K8S_NAMESPACE. Nothing connects at import.
"""

from __future__ import annotations

import os
from typing import Iterator

from llmplatform.errors import JobError, ServeError
from llmplatform.kube import GROUP, VERSION, KubeApi, api_client, connect  # noqa: F401 (connect: re-exported for callers)
from llmplatform.specs import FineTuneSpec, ServeSpec

CANCEL_ANNOTATION = f"{GROUP}/cancel"


# ---------------------------------------------------------------------------- pure builders


def _cr(kind: str, spec: FineTuneSpec | ServeSpec, namespace: str) -> dict:
    body = spec.model_dump(mode="json", exclude_unset=True)
    body.pop("name", None)  # metadata.name is the name
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": spec.name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "llm-platform"}},
        "spec": body,
    }


def finetune_job_cr(spec: FineTuneSpec, namespace: str) -> dict:
    """The FineTuneJob CR for a spec (only the fields the user set: defaults stay in one place)."""
    return _cr("FineTuneJob", spec, namespace)


def model_deployment_cr(spec: ServeSpec, namespace: str) -> dict:
    """The ModelDeployment CR for a serve spec."""
    return _cr("ModelDeployment", spec, namespace)


# ---------------------------------------------------------------------------- CLI-facing functions


def default_namespace(namespace: str | None = None) -> str:
    return namespace or os.environ.get("PLATFORM_K8S_NAMESPACE") or "default"


def cli_connect(kubeconfig: str | None = None, context: str | None = None) -> KubeApi:
    """`connect` for a CLI call: an API server that does not answer is a JobError at once, naming it
    (the client would retry, then print urllib3's chain). The operator keeps plain `connect`."""
    from llmplatform.reach import require_reachable

    client = api_client(kubeconfig, context)
    require_reachable(client.configuration.host, "the Kubernetes API", "check --kubeconfig/--context (or KUBECONFIG / "
                      "PLATFORM_K8S_CONTEXT) and that the cluster is running", JobError)
    return KubeApi(client)


def submit_finetune(spec: FineTuneSpec, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> dict:
    """Create the FineTuneJob (the operator starts it); returns its `finetune_row`.

    A job of the same name is an error: names are unique so runs never resume each other.
    """
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace)
    try:
        return finetune_row(api.create(finetune_job_cr(spec, ns)))
    except JobError as exc:
        if getattr(exc, "conflict", False):
            raise JobError(f"FineTuneJob {ns}/{spec.name} already exists; pick a new `name` (job names are unique so runs never resume each other)") from exc
        raise


def finetune_row(cr: dict) -> dict:
    """What `finetune list/status --target k8s` shows for one FineTuneJob."""
    st = cr.get("status") or {}
    meta = cr["metadata"]
    return {
        "name": meta["name"], "namespace": meta.get("namespace"), "phase": st.get("phase", "Pending"),
        "progress": st.get("progress"), "reason": st.get("reason"), "message": st.get("message"),
        "ray_job": st.get("rayJobName"), "ray_job_id": st.get("rayJobId"), "dashboard": st.get("dashboardURL"),
        "mlflow_run_id": st.get("mlflowRunId"), "created": meta.get("creationTimestamp"), "completed": st.get("completionTime"),
    }


def list_finetunes(*, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> list[dict]:
    api = api or cli_connect(kubeconfig, context)
    return [finetune_row(cr) for cr in api.list("FineTuneJob", default_namespace(namespace))]


def get_finetune(name: str, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> dict:
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace)
    cr = api.get("FineTuneJob", ns, name)
    if cr is None:
        raise JobError(f"no FineTuneJob {ns}/{name}; `platformctl finetune list --target k8s -n {ns}` shows the jobs there")
    return finetune_row(cr)


def cancel_finetune(name: str, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> dict:
    """Ask the operator to cancel: annotate; it marks the job Cancelled and deletes the RayJob.

    The FineTuneJob stays (its status is the record of what happened); delete it with kubectl.
    """
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace)
    get_finetune(name, namespace=ns, api=api)
    api.patch("FineTuneJob", ns, name, {"metadata": {"annotations": {CANCEL_ANNOTATION: "true"}}})
    return get_finetune(name, namespace=ns, api=api)


def finetune_logs(name: str, *, namespace: str | None = None, follow: bool = False, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> Iterator[str]:
    """The job's driver log: KubeRay's submitter pod (`ray job submit` follows it), else the head pod."""
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace)
    row = get_finetune(name, namespace=ns, api=api)
    rayjob = row["ray_job"] or name
    submitters = api.pods(ns, f"job-name={rayjob}")
    if submitters:
        pod = sorted(submitters, key=lambda p: p.metadata.creation_timestamp or 0)[-1]
        yield from api.pod_log(ns, pod.metadata.name, follow=follow)
        return
    heads = api.pods(ns, f"ray.io/node-type=head,{GROUP}/finetunejob={name}")
    if not heads:
        raise JobError(f"FineTuneJob {ns}/{name} has no submitter or head pod (phase {row['phase']}); "
                       "a finished job's cluster is removed after its TTL: read the run in MLflow instead")
    yield from api.pod_log(ns, heads[0].metadata.name, container="ray-head", follow=follow)


def apply_deployment(spec: ServeSpec, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> dict:
    """Create the ModelDeployment, or replace its spec when it exists; returns its `deployment_row`
    plus `action` (created|updated). The operator applies adapter-only changes in place."""
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace)
    cr = model_deployment_cr(spec, ns)
    try:
        existing = api.get("ModelDeployment", ns, spec.name)
        if existing is None:
            return {**deployment_row(api.create(cr)), "action": "created"}
        # JSON merge patch can't drop keys a user removed: null out the old ones.
        patch_spec = {k: None for k in (existing.get("spec") or {}) if k not in cr["spec"]}
        patch_spec.update(cr["spec"])
        return {**deployment_row(api.patch("ModelDeployment", ns, spec.name, {"spec": patch_spec})), "action": "updated"}
    except JobError as exc:
        raise ServeError(str(exc)) from exc


def deployment_row(cr: dict) -> dict:
    st = cr.get("status") or {}
    return {"name": cr["metadata"]["name"], "phase": st.get("phase", "Pending"), "served": st.get("servedVersion"),
            "endpoint": st.get("endpoint"), "message": st.get("message")}
