"""`--target k8s`: FineTuneJob, ModelDeployment and EvaluationJob custom resources.

Pure builders `finetune_job_cr(spec, namespace)` / `model_deployment_cr(spec, namespace)` /
`evaluation_job_cr(spec, namespace)` turn specs into CRs (the operator does the rest; a
fine-tune spec with a `sweep:` section is a sweep there too). The CLI functions below talk to the API server
through `llmplatform.kube` (the client the operator uses too); they take
kubeconfig/context/namespace, falling back to KUBECONFIG, PLATFORM_K8S_CONTEXT and
PLATFORM_K8S_NAMESPACE, then to the kubeconfig context's namespace (kubectl's default), then
`default`. A CR no operator picks up within `operator_timeout_s` (default 15 s,
$PLATFORM_K8S_OPERATOR_TIMEOUT) is reported as such instead of waiting forever: the operator
watches only its own namespace by default. Nothing connects at import.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

from llmplatform.errors import JobError, ServeError
from llmplatform.kube import GROUP, SERVE_PORT, VERSION, KubeApi, api_client, connect, serve_service  # noqa: F401 (connect: re-exported)
from llmplatform.specs import EvaluationSpec, FineTuneSpec, ServeSpec

CANCEL_ANNOTATION = f"{GROUP}/cancel"
FINETUNE_TERMINAL = ("Succeeded", "Failed", "Cancelled")
OPERATOR_TIMEOUT_ENV = "PLATFORM_K8S_OPERATOR_TIMEOUT"
OPERATOR_TIMEOUT_S = 15.0  # the operator writes a first status within a second or two when it runs


class NoOperatorError(JobError):
    """A CR got no status from any llm-platform operator within the bound."""


# ---------------------------------------------------------------------------- pure builders


def _cr(kind: str, spec: FineTuneSpec | ServeSpec | EvaluationSpec, namespace: str) -> dict:
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


def evaluation_job_cr(spec: EvaluationSpec, namespace: str) -> dict:
    """The EvaluationJob CR for an evaluation spec. Every metric is written as an object (the CRD's
    schema has no bare scorer names), so the whole validated list goes in."""
    cr = _cr("EvaluationJob", spec, namespace)
    cr["spec"]["metrics"] = [m.model_dump(mode="json", exclude_unset=True) for m in spec.metrics]
    return cr


# ---------------------------------------------------------------------------- CLI-facing functions


def default_namespace(namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None) -> str:
    """--namespace, else $PLATFORM_K8S_NAMESPACE, else the kubeconfig context's namespace
    (in a pod: the service account's), else `default`, as kubectl chooses."""
    from llmplatform.kube import context_namespace

    return namespace or os.environ.get("PLATFORM_K8S_NAMESPACE") or context_namespace(kubeconfig, context) or "default"


def picked_up(cr: dict, before: dict | None = None) -> bool:
    """Whether an operator has reconciled this CR: its status observes the CR's generation, or
    (an operator that refused the spec writes only phase/reason/message) the status is new or
    changed since `before`, the status seen before an update."""
    st = cr.get("status") or {}
    observed, generation = st.get("observedGeneration"), (cr.get("metadata") or {}).get("generation")
    if observed is not None and (generation is None or observed >= generation):
        return True
    if before is None:
        return bool(st.get("phase"))
    return bool(st) and st != before


def no_operator_message(kind: str, namespace: str, name: str, waited_s: float) -> str:
    return (f"no llm-platform operator has picked up {kind} {namespace}/{name} (no status after {waited_s:g}s). "
            f"Check that the operator is running and watches namespace {namespace!r}: it watches only its own namespace "
            "(WATCH_NAMESPACE) unless told otherwise; `kubectl get deployments -A -l app.kubernetes.io/name=llm-operator` "
            f"shows where it runs. Submit there with `-n NAMESPACE`, or install the operator in {namespace!r}. "
            f"The {kind} stays in {namespace!r} (`kubectl delete {kind.lower()} {name} -n {namespace}` removes it); "
            f"wait longer with --operator-timeout or ${OPERATOR_TIMEOUT_ENV}.")


def wait_for_operator(api: KubeApi, kind: str, namespace: str, name: str, timeout_s: float, *, before: dict | None = None,
                      poll_s: float = 0.5, error: type[JobError] | type[ServeError] = JobError) -> dict:
    """The CR once an operator has reconciled it; `error` (a NoOperatorError message) after `timeout_s`.
    A timeout of 0 or less skips the check and returns the CR as it is."""
    deadline = time.monotonic() + timeout_s
    while True:
        cr = api.get(kind, namespace, name)
        if cr is None:
            raise error(f"{kind} {namespace}/{name} was deleted while waiting for the operator")
        if timeout_s <= 0 or picked_up(cr, before):
            return cr
        if time.monotonic() >= deadline:
            raise (NoOperatorError if error is JobError else error)(no_operator_message(kind, namespace, name, timeout_s))
        time.sleep(poll_s)


def cli_connect(kubeconfig: str | None = None, context: str | None = None) -> KubeApi:
    """`connect` for a CLI call: an API server that does not answer is a JobError at once, naming it
    (the client would retry, then print urllib3's chain). The operator keeps plain `connect`."""
    from llmplatform.reach import require_reachable

    client = api_client(kubeconfig, context)
    require_reachable(client.configuration.host, "the Kubernetes API", "check --kubeconfig/--context (or KUBECONFIG / "
                      "PLATFORM_K8S_CONTEXT) and that the cluster is running", JobError)
    return KubeApi(client)


def submit_finetune(spec: FineTuneSpec, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                    api: KubeApi | None = None, operator_timeout_s: float = 0) -> dict:
    """Create the FineTuneJob (the operator starts it); returns its `finetune_row`, once an
    operator has picked it up when `operator_timeout_s` > 0 (else NoOperatorError).

    A job of the same name is an error: resubmitting the same name and spec after `kubectl delete`
    resumes from its checkpoints (the operator's job id is a hash of namespace, name and spec).
    """
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace, kubeconfig, context)
    created = _create_job(api, finetune_job_cr(spec, ns), operator_timeout_s,
                          f"FineTuneJob {ns}/{spec.name} already exists. To resubmit it (same spec: resumes from its last "
                          f"checkpoint), delete it first: `kubectl delete finetunejob {spec.name} -n {ns}`; "
                          "to train separately, pick a new `name`")
    return finetune_row(created)


def _create_job(api: KubeApi, cr: dict, operator_timeout_s: float, exists: str) -> dict:
    """Create a job CR (FineTuneJob, EvaluationJob); `exists` is the error when its name is taken. With
    `operator_timeout_s` > 0, the CR as the operator first reconciled it (else NoOperatorError)."""
    try:
        created = api.create(cr)
    except JobError as exc:
        if getattr(exc, "conflict", False):
            raise JobError(exists) from exc
        raise
    if operator_timeout_s > 0:
        meta = cr["metadata"]
        created = wait_for_operator(api, cr["kind"], meta["namespace"], meta["name"], operator_timeout_s)
    return created


def finetune_row(cr: dict) -> dict:
    """What `finetune list/status --target k8s` shows for one FineTuneJob."""
    st = cr.get("status") or {}
    meta = cr["metadata"]
    return {
        "name": meta["name"], "namespace": meta.get("namespace"), "phase": st.get("phase", "Pending"),
        "progress": st.get("progress"), "reason": st.get("reason"), "message": st.get("message"),
        "ray_job": st.get("rayJobName"), "ray_job_id": st.get("rayJobId"), "dashboard": st.get("dashboardURL"),
        "mlflow_run_id": st.get("mlflowRunId"), "registered_model": st.get("registeredModel"), "registered_version": st.get("registeredVersion"),
        "created": meta.get("creationTimestamp"), "completed": st.get("completionTime"),
    }


def submit_evaluation(spec: EvaluationSpec, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                      api: KubeApi | None = None, operator_timeout_s: float = 0) -> dict:
    """Create the EvaluationJob (the operator runs it as a RayJob); returns its `evaluation_row`, once an
    operator has picked it up when `operator_timeout_s` > 0 (else NoOperatorError)."""
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace, kubeconfig, context)
    created = _create_job(api, evaluation_job_cr(spec, ns), operator_timeout_s,
                          f"EvaluationJob {ns}/{spec.name} already exists; to run it again delete it first "
                          f"(`kubectl delete evaluationjob {spec.name} -n {ns}`), or pick a new `name`")
    return evaluation_row(created)


def evaluation_row(cr: dict) -> dict:
    """What `eval submit/list --target k8s` shows for one EvaluationJob."""
    st = cr.get("status") or {}
    meta, spec = cr["metadata"], cr.get("spec") or {}
    return {"name": meta["name"], "namespace": meta.get("namespace"), "phase": st.get("phase", "Pending"), "reason": st.get("reason"),
            "message": st.get("message"), "dataset": (spec.get("dataset") or {}).get("name"), "models": ", ".join(spec.get("models") or []),
            "ray_job": st.get("rayJobName"), "results": st.get("results"), "created": meta.get("creationTimestamp"), "completed": st.get("completionTime")}


def list_evaluations(*, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> list[dict]:
    api = api or cli_connect(kubeconfig, context)
    return [evaluation_row(cr) for cr in api.list("EvaluationJob", default_namespace(namespace, kubeconfig, context))]


# What a follower prints a line for when it changes (not `dashboard`, `created`: they don't move).
WATCHED_FIELDS = ("phase", "reason", "message", "progress", "mlflow_run_id", "registered_version")


def change_line(row: dict) -> str:
    """`Running (JobRunning): training  progress 5/20 steps (25%)  mlflow run abc` for `--follow`."""
    head = row["phase"] + (f" ({row['reason']})" if row.get("reason") else "") + (f": {row['message']}" if row.get("message") else "")
    tail = [f"progress {row['progress']}"] if row.get("progress") else []
    tail += [f"mlflow run {row['mlflow_run_id']}"] if row.get("mlflow_run_id") else []
    if row.get("registered_version"):
        tail.append(f"registered models:/{row.get('registered_model') or '?'}/{row['registered_version']}")
    return "  ".join([head, *tail])


def watch_finetune(name: str, namespace: str, api: KubeApi, *, operator_timeout_s: float, poll_s: float = 2.0) -> Iterator[dict]:
    """Yield the FineTuneJob's `finetune_row` each time a WATCHED_FIELDS value changes, until it
    is Succeeded, Failed or Cancelled. NoOperatorError when no operator gives it a status within
    `operator_timeout_s` (a job already reconciled is not held to that bound)."""
    row = finetune_row(wait_for_operator(api, "FineTuneJob", namespace, name, operator_timeout_s))
    last = None
    while True:
        seen = tuple(row.get(k) for k in WATCHED_FIELDS)
        if seen != last:
            yield row
            last = seen
        if row["phase"] in FINETUNE_TERMINAL:
            return
        time.sleep(poll_s)
        row = get_finetune(name, namespace=namespace, api=api)


def list_finetunes(*, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> list[dict]:
    api = api or cli_connect(kubeconfig, context)
    return [finetune_row(cr) for cr in api.list("FineTuneJob", default_namespace(namespace, kubeconfig, context))]


def get_finetune(name: str, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> dict:
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace, kubeconfig, context)
    cr = api.get("FineTuneJob", ns, name)
    if cr is None:
        raise JobError(f"no FineTuneJob {ns}/{name}; `platformctl finetune list --target k8s -n {ns}` shows the jobs there")
    return finetune_row(cr)


def cancel_finetune(name: str, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> dict:
    """Ask the operator to cancel: annotate; it marks the job Cancelled and deletes the RayJob.

    The FineTuneJob stays (its status is the record of what happened); delete it with kubectl.
    """
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace, kubeconfig, context)
    get_finetune(name, namespace=ns, api=api)
    api.patch("FineTuneJob", ns, name, {"metadata": {"annotations": {CANCEL_ANNOTATION: "true"}}})
    return get_finetune(name, namespace=ns, api=api)


def finetune_logs(name: str, *, namespace: str | None = None, follow: bool = False, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> Iterator[str]:
    """The job's driver log: KubeRay's submitter pod (`ray job submit` follows it), else the head pod."""
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace, kubeconfig, context)
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


def apply_deployment(spec: ServeSpec, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                     api: KubeApi | None = None, operator_timeout_s: float = 0) -> dict:
    """Create the ModelDeployment, or replace its spec when it exists; returns its `deployment_row`
    plus `action` (created|updated), once an operator has picked the change up when
    `operator_timeout_s` > 0 (else a ServeError saying no operator watches the namespace).
    The operator applies adapter-only changes in place."""
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace, kubeconfig, context)
    cr = model_deployment_cr(spec, ns)
    try:
        existing = api.get("ModelDeployment", ns, spec.name)
        if existing is None:
            live, action = api.create(cr), "created"
        else:
            # JSON merge patch can't drop keys a user removed: null out the old ones.
            patch_spec = {k: None for k in (existing.get("spec") or {}) if k not in cr["spec"]}
            patch_spec.update(cr["spec"])
            live, action = api.patch("ModelDeployment", ns, spec.name, {"spec": patch_spec}), "updated"
        if operator_timeout_s > 0:
            before = None if existing is None else (existing.get("status") or {})
            live = wait_for_operator(api, "ModelDeployment", ns, spec.name, operator_timeout_s, before=before, error=ServeError)
    except JobError as exc:
        raise ServeError(str(exc)) from exc
    return {**deployment_row(live), "action": action}


def deployment_row(cr: dict) -> dict:
    """What `serve list/status --target k8s` shows for one ModelDeployment."""
    st = cr.get("status") or {}
    meta = cr["metadata"]
    return {"name": meta["name"], "namespace": meta.get("namespace"), "phase": st.get("phase", "Pending"), "served": st.get("servedVersion"),
            "endpoint": st.get("endpoint"), "reason": st.get("reason"), "message": st.get("message"),
            "ray_service": st.get("rayServiceName"), "route_prefix": (cr.get("spec") or {}).get("route_prefix", "/"),
            "dashboard": st.get("dashboardURL"), "created": meta.get("creationTimestamp")}


def list_deployments(*, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> list[dict]:
    api = api or cli_connect(kubeconfig, context)
    try:
        return [deployment_row(cr) for cr in api.list("ModelDeployment", default_namespace(namespace, kubeconfig, context))]
    except JobError as exc:
        raise ServeError(str(exc)) from exc


def get_deployment(name: str, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None, api: KubeApi | None = None) -> dict:
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace, kubeconfig, context)
    try:
        cr = api.get("ModelDeployment", ns, name)
    except JobError as exc:
        raise ServeError(str(exc)) from exc
    if cr is None:
        raise ServeError(f"no ModelDeployment {ns}/{name}; `platformctl serve list --target k8s -n {ns}` shows the deployments there")
    return deployment_row(cr)


def delete_deployment(name: str, *, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                      api: KubeApi | None = None, wait_s: float = 0, poll_s: float = 0.5) -> dict:
    """Delete the ModelDeployment; its RayService (owned by it) and the Ray cluster follow.
    With `wait_s`, wait that long for it to be gone (the operator's finalizer goes first), as
    `kubectl delete` does; `gone` says whether it is."""
    api = api or cli_connect(kubeconfig, context)
    ns = default_namespace(namespace, kubeconfig, context)
    try:
        if not api.delete("ModelDeployment", ns, name):
            raise ServeError(f"no ModelDeployment {ns}/{name}; `platformctl serve list --target k8s -n {ns}` shows the deployments there")
        deadline = time.monotonic() + wait_s
        while (gone := api.get("ModelDeployment", ns, name) is None) is False and time.monotonic() < deadline:
            time.sleep(poll_s)
    except JobError as exc:
        raise ServeError(str(exc)) from exc
    return {"name": name, "namespace": ns, "gone": gone}


def chat_base_url(row: dict, url: str | None = None) -> str:
    """The OpenAI base URL (`.../v1`) for `serve chat --target k8s`: `url` when given (a
    `kubectl port-forward` address, with or without /v1), else the CR's status.endpoint, the
    RayService's serve Service inside the cluster; plus the application's route prefix."""
    base = url or row.get("endpoint")
    if not base:
        raise ServeError(f"ModelDeployment {row['namespace']}/{row['name']} has no endpoint yet (phase {row['phase']}); "
                         "wait for the operator, or pass --url")
    base = base.rstrip("/")
    if base.endswith("/v1"):
        return base
    return base + (row.get("route_prefix") or "/").rstrip("/") + "/v1"


def port_forward_hint(row: dict) -> str:
    service = serve_service(row.get("ray_service") or row["name"])
    return (f"from outside the cluster run `kubectl port-forward -n {row['namespace']} svc/{service} {SERVE_PORT}:{SERVE_PORT}` "
            f"and pass --url http://127.0.0.1:{SERVE_PORT}")
