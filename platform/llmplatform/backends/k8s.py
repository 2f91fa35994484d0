"""`--target k8s`: FineTuneJob and ModelDeployment custom resources, and a thin Kubernetes adapter.

Pure builders `finetune_job_cr(spec, namespace)` / `model_deployment_cr(spec, namespace)` turn
specs into CRs (the operator does the rest). `KubeApi` is the small adapter over the official
`kubernetes` client that both the CLI functions below and the operator use: get / create / patch /
patch_status / delete / list for our kinds and KubeRay's, with API errors mapped to `JobError`
(permanent, message names the object and the fix) or `TransientApiError` (retry). The CLI
functions take kubeconfig/context/namespace, falling back to KUBECONFIG, PLATFORM_K8S_CONTEXT and
PLATFORM_K8S_NAMESPACE. Nothing connects at import.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from llmplatform.errors import JobError, ServeError
from llmplatform.specs import FineTuneSpec, ServeSpec

GROUP = "llmplatform.io"
VERSION = "v1alpha1"
KINDS: dict[str, tuple[str, str, str]] = {  # kind -> (group, version, plural)
    "FineTuneJob": (GROUP, VERSION, "finetunejobs"),
    "ModelDeployment": (GROUP, VERSION, "modeldeployments"),
    "RayJob": ("ray.io", "v1", "rayjobs"),
    "RayService": ("ray.io", "v1", "rayservices"),
    "RayCluster": ("ray.io", "v1", "rayclusters"),
}
CANCEL_ANNOTATION = f"{GROUP}/cancel"


class TransientApiError(JobError):
    """The API server was unreachable, overloaded or timed out: retry later."""


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


# ---------------------------------------------------------------------------- adapter


def default_namespace(namespace: str | None = None) -> str:
    return namespace or os.environ.get("PLATFORM_K8S_NAMESPACE") or "default"


def api_client(kubeconfig: str | None = None, context: str | None = None, host: str | None = None):
    """A kubernetes ApiClient: explicit host (tests), kubeconfig/context (flags or env), or in-cluster."""
    from kubernetes import client, config

    if host:
        cfg = client.Configuration(host=host)
        return client.ApiClient(cfg)
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    context = context or os.environ.get("PLATFORM_K8S_CONTEXT")
    if not kubeconfig and not context and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError) as exc:
        raise JobError(f"cannot load kubeconfig {kubeconfig or '~/.kube/config'} (context {context or 'current'}): {exc}; "
                       "pass --kubeconfig/--context or set KUBECONFIG / PLATFORM_K8S_CONTEXT") from exc


class KubeApi:
    """Custom objects (ours and KubeRay's) and pod logs; errors mapped, 404 -> None/False."""

    def __init__(self, api_client: Any):
        from kubernetes import client

        self._client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status in (429, 500, 502, 503, 504):
                raise TransientApiError(f"{what}: API server answered {exc.status} {exc.reason}; retrying") from exc
            raise JobError(f"{what}: {exc.status} {exc.reason}: {_api_message(exc)}") from exc
        except (HTTPError, OSError) as exc:
            raise TransientApiError(f"{what}: cannot reach the Kubernetes API ({exc})") from exc

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        g, v, p = KINDS[kind]
        try:
            return self._custom.get_namespaced_custom_object(g, v, namespace, p, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            return self._call(f"get {kind} {namespace}/{name}", _reraise, exc)

    def list(self, kind: str, namespace: str, label_selector: str | None = None) -> list[dict]:
        g, v, p = KINDS[kind]
        kwargs = {"label_selector": label_selector} if label_selector else {}
        out = self._call(f"list {kind} in {namespace}", self._custom.list_namespaced_custom_object, g, v, namespace, p, **kwargs)
        return list(out.get("items", []))

    def create(self, obj: dict) -> dict:
        """Create; raises JobError (status 409 in `.conflict`) when it exists."""
        from kubernetes.client.exceptions import ApiException

        kind, meta = obj["kind"], obj["metadata"]
        g, v, p = KINDS[kind]
        try:
            return self._custom.create_namespaced_custom_object(g, v, meta["namespace"], p, obj)
        except ApiException as exc:
            if exc.status == 409:
                err = JobError(f"{kind} {meta['namespace']}/{meta['name']} already exists")
                err.conflict = True  # type: ignore[attr-defined]
                raise err from exc
            return self._call(f"create {kind} {meta['namespace']}/{meta['name']}", _reraise, exc)

    def patch(self, kind: str, namespace: str, name: str, patch: dict) -> dict:
        g, v, p = KINDS[kind]
        return self._call(f"patch {kind} {namespace}/{name}", self._custom.patch_namespaced_custom_object, g, v, namespace, p, name, patch)

    def patch_status(self, kind: str, namespace: str, name: str, status: dict) -> dict:
        g, v, p = KINDS[kind]
        return self._call(f"patch {kind} {namespace}/{name} status", self._custom.patch_namespaced_custom_object_status, g, v, namespace, p, name, {"status": status})

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (owned objects follow); False when already gone."""
        from kubernetes.client.exceptions import ApiException

        g, v, p = KINDS[kind]
        try:
            self._custom.delete_namespaced_custom_object(g, v, namespace, p, name, propagation_policy="Background")
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            return self._call(f"delete {kind} {namespace}/{name}", _reraise, exc)

    def pods(self, namespace: str, label_selector: str) -> list[Any]:
        return list(self._call(f"list pods {label_selector}", self._core.list_namespaced_pod, namespace, label_selector=label_selector).items)

    def pod_log(self, namespace: str, pod: str, container: str | None = None, follow: bool = False) -> Iterator[str]:
        if not follow:
            yield self._call(f"logs of pod {pod}", self._core.read_namespaced_pod_log, pod, namespace, container=container)
            return
        resp = self._call(f"logs of pod {pod}", self._core.read_namespaced_pod_log, pod, namespace, container=container, follow=True, _preload_content=False)
        for chunk in resp.stream():
            yield chunk.decode("utf-8", "replace")


def _reraise(exc: Exception):
    raise exc


def _api_message(exc: Any) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", exc.body)
    except (TypeError, ValueError):
        return str(exc.body)


def connect(kubeconfig: str | None = None, context: str | None = None, host: str | None = None) -> KubeApi:
    return KubeApi(api_client(kubeconfig, context, host))


def cli_connect(kubeconfig: str | None = None, context: str | None = None) -> KubeApi:
    """`connect` for a CLI call: an API server that does not answer is a JobError at once, naming it
    (the client would retry, then print urllib3's chain). The operator keeps plain `connect`."""
    from llmplatform.reach import require_reachable

    client = api_client(kubeconfig, context)
    require_reachable(client.configuration.host, "the Kubernetes API", "check --kubeconfig/--context (or KUBECONFIG / "
                      "PLATFORM_K8S_CONTEXT) and that the cluster is running", JobError)
    return KubeApi(client)


# ---------------------------------------------------------------------------- CLI-facing functions


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
