"""The Kubernetes client both faces share: the CLI's k8s backend and the operator.

`KubeApi` is a small adapter over the official `kubernetes` client: get / create / patch /
patch_status / delete / list for our kinds and KubeRay's, and pod logs, with API errors mapped
to `JobError` (permanent, message names the object and the fix) or `TransientApiError` (retry).
`connect(kubeconfig, context, host)` builds one: an explicit host (tests), a kubeconfig/context
(flags, or KUBECONFIG / PLATFORM_K8S_CONTEXT), or the in-cluster config; `context_namespace` reads
the namespace that same choice implies (the context's `namespace`, in-cluster the service
account's). Nothing connects at import.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from llmplatform.errors import JobError

GROUP = "llmplatform.io"
VERSION = "v1alpha1"
KINDS: dict[str, tuple[str, str, str]] = {  # kind -> (group, version, plural)
    "FineTuneJob": (GROUP, VERSION, "finetunejobs"),
    "ModelDeployment": (GROUP, VERSION, "modeldeployments"),
    "EvaluationJob": (GROUP, VERSION, "evaluationjobs"),
    "RayJob": ("ray.io", "v1", "rayjobs"),
    "RayService": ("ray.io", "v1", "rayservices"),
    "RayCluster": ("ray.io", "v1", "rayclusters"),
}

SERVE_PORT = 8000


def serve_service(ray_service: str) -> str:
    """The Service KubeRay puts in front of a RayService's Serve application (`<name>-serve-svc`)."""
    return f"{ray_service}-serve-svc"


# In a pod, the namespace of its service account (what kubectl uses there too).
SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class TransientApiError(JobError):
    """The API server was unreachable, overloaded or timed out: retry later."""


def api_client(kubeconfig: str | None = None, context: str | None = None, host: str | None = None):
    """A kubernetes ApiClient: explicit host (tests), kubeconfig/context (flags or env), or in-cluster."""
    from kubernetes import client, config

    if host:
        cfg = client.Configuration(host=host)
        return client.ApiClient(cfg)
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    context = context or os.environ.get("PLATFORM_K8S_CONTEXT")
    if _in_cluster(kubeconfig, context):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError) as exc:
        raise JobError(f"cannot load kubeconfig {kubeconfig or '~/.kube/config'} (context {context or 'current'}): {exc}; "
                       "pass --kubeconfig/--context or set KUBECONFIG / PLATFORM_K8S_CONTEXT") from exc


def _in_cluster(kubeconfig: str | None, context: str | None) -> bool:
    return not kubeconfig and not context and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def context_namespace(kubeconfig: str | None = None, context: str | None = None) -> str | None:
    """The namespace the kubeconfig context in use names (kubectl's default), None when it names none.

    Same choice of config as `api_client`: --kubeconfig or $KUBECONFIG (a `:`-separated list is
    merged), --context or $PLATFORM_K8S_CONTEXT or the current context; in a pod, the service
    account's namespace. An unreadable kubeconfig gives None: connecting reports it, with the fix.
    """
    from kubernetes import config

    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    context = context or os.environ.get("PLATFORM_K8S_CONTEXT")
    if _in_cluster(kubeconfig, context):
        try:
            return open(SERVICE_ACCOUNT_NAMESPACE_FILE, encoding="utf-8").read().strip() or None
        except OSError:
            return None
    try:
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig or os.path.expanduser("~/.kube/config"))
    except (config.ConfigException, OSError):
        return None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
    return ((chosen or {}).get("context") or {}).get("namespace") or None


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
