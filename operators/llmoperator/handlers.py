"""kopf handlers: thin entry points over `llmoperator.reconcile`.

Deletion needs no handler and no finalizer: every RayJob/RayService carries a controller owner
reference, so the garbage collector removes it (and KubeRay's RayCluster under it) with its owner,
even while the operator is down. `make_registry(deps)` registers every handler on a fresh `kopf.OperatorRegistry` (no import-time
side effects; tests build one against an in-memory API). Each handler reads, calls one pure
function, writes, and maps errors: an invalid spec is a `kopf.PermanentError` with the problems in
`status.message`; an unreachable API server or MLflow is a `kopf.TemporaryError(delay=...)`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import kopf

from llmplatform.kube import KubeApi, TransientApiError
from llmplatform.errors import JobError, RegistryError, SpecError
from llmplatform.resolve import ResolveError

from llmoperator.reconcile import deployment, evaluation, finetune, status
from llmoperator.reconcile.common import ANNOTATION_CANCEL, GROUP, LABEL_DEPLOYMENT, LABEL_EVALUATION, LABEL_FINETUNE, OperatorConfig

FTJ = (GROUP, "v1alpha1", "finetunejobs")
MDEP = (GROUP, "v1alpha1", "modeldeployments")
EVJ = (GROUP, "v1alpha1", "evaluationjobs")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Deps:
    """What the handlers talk to; injected so tests use an in-memory API and a fake registry."""

    api: KubeApi
    cfg: OperatorConfig = field(default_factory=OperatorConfig)
    resolve_version: Callable[[str, str | None], str] | None = None  # (models:/N@A, tracking_uri) -> version
    job_progress: Callable[[dict], dict | None] | None = None  # FineTuneJob body -> {mlflowRunId, progress[, registeredModel, registeredVersion]}
    eval_results: Callable[[dict], dict | None] | None = None  # EvaluationJob body -> {results: [{model, runId, status, metrics}]}
    check_interval_s: float = 30.0  # FineTuneJob health checks (cluster present, progress)
    registry_poll_s: float = 5.0  # the registry timer's tick; each ModelDeployment re-resolves on its own registry_poll_s
    retry_delay_s: float = 15.0  # TemporaryError backoff (API server, MLflow)
    now: Callable[[], str] = utcnow


def _set_status(deps: Deps, kind: str, obj: dict, fields: dict) -> None:
    """Patch `obj`'s status with `fields` and the matching `conditions` (the full list, when they
    change): every write of a phase goes through here, so conditions never lag the phase."""
    meta = obj["metadata"]
    patch = status.with_conditions(kind, obj.get("status"), fields, meta.get("generation", 1), deps.now())
    if patch:
        deps.api.patch_status(kind, meta["namespace"], meta["name"], patch)


def _permanent(deps: Deps, kind: str, obj: dict, exc: SpecError | ResolveError) -> kopf.PermanentError:
    current = obj.get("status") or {}
    fields = {"phase": "Failed", "reason": "InvalidSpec", "message": str(exc), "lastTransitionTime": deps.now()}
    if current.get("phase") != "Failed" or current.get("message") != str(exc):
        _set_status(deps, kind, obj, fields)
    return kopf.PermanentError(str(exc))


# ---------------------------------------------------------------------------- FineTuneJob


def create_rayjob(deps: Deps, body: dict, logger: logging.Logger) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    current = dict(body.get("status") or {})
    try:
        rayjob = finetune.rayjob_for(body, deps.cfg)
    except (SpecError, ResolveError) as exc:
        raise _permanent(deps, "FineTuneJob", body, exc) from exc
    try:
        deps.api.create(rayjob)
        logger.info("created RayJob %s/%s", ns, name)
    except TransientApiError as exc:
        raise kopf.TemporaryError(str(exc), delay=deps.retry_delay_s) from exc
    except JobError as exc:
        if not getattr(exc, "conflict", False):
            raise kopf.PermanentError(str(exc)) from exc
        existing = deps.api.get("RayJob", ns, name) or {}
        owners = [o.get("uid") for o in existing.get("metadata", {}).get("ownerReferences", [])]
        if body["metadata"].get("uid") not in owners:
            msg = f"a RayJob named {name} exists and is not owned by this FineTuneJob; delete it or rename the job"
            _set_status(deps, "FineTuneJob", body, {"phase": "Failed", "reason": "NameTaken", "message": msg, "lastTransitionTime": deps.now()})
            raise kopf.PermanentError(msg) from exc
    fields = {"phase": "Pending", "reason": "Submitted", "message": "RayJob created; waiting for KubeRay",
              "rayJobName": name, "observedGeneration": body["metadata"].get("generation", 1), "lastTransitionTime": deps.now()}
    _set_status(deps, "FineTuneJob", body, {k: v for k, v in fields.items() if current.get(k) != v})


def mirror_rayjob(deps: Deps, rayjob: dict | None, ns: str, job_name: str, cluster_gone: bool = False) -> dict:
    """Recompute a FineTuneJob's status from its RayJob (None: gone); returns the fields written."""
    ftj = deps.api.get("FineTuneJob", ns, job_name)
    if ftj is None or ftj["metadata"].get("deletionTimestamp"):
        return {}
    lost = (cluster_gone or rayjob is None) and not status.is_terminal(ftj.get("status"))
    resume = _resume_advice(deps, ftj) if lost else None
    fields = status.finetune_status(rayjob, ftj.get("status"), deps.now(), cluster_gone=cluster_gone, resume=resume)
    _set_status(deps, "FineTuneJob", ftj, fields)
    return fields


def _resume_advice(deps: Deps, ftj: dict) -> str | None:
    try:
        return finetune.resume_advice(ftj, deps.cfg)
    except (SpecError, ResolveError):  # never ran, so nothing to resume: the generic advice
        return None


def check_job(deps: Deps, body: dict) -> None:
    """Periodic: catch what no RayJob event announces (cluster lost, RayJob gone) and read progress."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    current = body.get("status") or {}
    if awaiting_registration(current, deps.now()) and deps.job_progress:
        _record_result(deps, body, current)
        return
    if status.is_terminal(current) or not current.get("rayJobName"):
        return
    try:
        rayjob = deps.api.get("RayJob", ns, current["rayJobName"])
        cluster = (rayjob or {}).get("status", {}).get("rayClusterName")
        gone = bool(cluster) and current.get("phase") == "Running" and deps.api.get("RayCluster", ns, cluster) is None
        fields = mirror_rayjob(deps, rayjob, ns, name, cluster_gone=gone)
        if deps.job_progress and not status.is_terminal({**current, **fields}):
            found = deps.job_progress(body) or {}
            latest = {**body, "status": {**current, **fields}}  # with the phase mirror_rayjob just wrote
            _set_status(deps, "FineTuneJob", latest, {k: v for k, v in found.items() if v is not None and current.get(k) != v})
    except (TransientApiError, RegistryError, OSError) as exc:  # API server or MLflow unreachable
        raise kopf.TemporaryError(str(exc), delay=deps.retry_delay_s) from exc


RESULT_WINDOW_S = 900  # after Succeeded, look for the registered version this long (MLflow may lag or be down)


def awaiting_registration(current: dict, now: str) -> bool:
    """A job that succeeded recently whose status doesn't yet name the registered model version."""
    if current.get("phase") != "Succeeded" or current.get("registeredVersion"):
        return False
    done = current.get("lastTransitionTime")  # the operator's clock, when the phase became Succeeded
    try:
        age = (_parse_time(now) - _parse_time(done)).total_seconds() if done else 0.0
    except ValueError:
        return False
    return age <= RESULT_WINDOW_S


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _record_result(deps: Deps, body: dict, current: dict) -> None:
    """The succeeded job's final progress and registered version (from its MLflow run) into its status."""
    try:
        found = deps.job_progress(body) or {}  # type: ignore[misc]
    except (RegistryError, OSError) as exc:
        raise kopf.TemporaryError(str(exc), delay=deps.retry_delay_s) from exc
    fields = {k: v for k, v in found.items() if v is not None and current.get(k) != v}
    if fields.get("registeredVersion"):
        fields["message"] = f"training finished; registered {fields.get('registeredModel') or current.get('registeredModel')} version {fields['registeredVersion']}"
    _set_status(deps, "FineTuneJob", body, fields)


def cancel_job(deps: Deps, body: dict, logger: logging.Logger) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    current = body.get("status") or {}
    if status.is_terminal(current):
        return
    _set_status(deps, "FineTuneJob", body, {"phase": "Cancelled", "reason": "Cancelled", "message": "cancelled by request; the Ray cluster is being removed",
                                                 "lastTransitionTime": deps.now(), "completionTime": deps.now()})
    try:
        deps.api.delete("RayJob", ns, current.get("rayJobName") or name)
    except TransientApiError as exc:
        raise kopf.TemporaryError(str(exc), delay=deps.retry_delay_s) from exc
    logger.info("cancelled FineTuneJob %s/%s", ns, name)


# ---------------------------------------------------------------------------- EvaluationJob


def create_eval_rayjob(deps: Deps, body: dict, logger: logging.Logger) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    current = dict(body.get("status") or {})
    try:
        rayjob = evaluation.rayjob_for(body, deps.cfg)
    except SpecError as exc:
        raise _permanent(deps, "EvaluationJob", body, exc) from exc
    try:
        deps.api.create(rayjob)
        logger.info("created RayJob %s/%s", ns, name)
    except TransientApiError as exc:
        raise kopf.TemporaryError(str(exc), delay=deps.retry_delay_s) from exc
    except JobError as exc:
        if not getattr(exc, "conflict", False):
            raise kopf.PermanentError(str(exc)) from exc
        existing = deps.api.get("RayJob", ns, name) or {}
        if body["metadata"].get("uid") not in [o.get("uid") for o in existing.get("metadata", {}).get("ownerReferences", [])]:
            msg = f"a RayJob named {name} exists and is not owned by this EvaluationJob; delete it or rename the job"
            _set_status(deps, "EvaluationJob", body, {"phase": "Failed", "reason": "NameTaken", "message": msg, "lastTransitionTime": deps.now()})
            raise kopf.PermanentError(msg) from exc
    fields = {"phase": "Pending", "reason": "Submitted", "message": "RayJob created; waiting for KubeRay", "rayJobName": name,
              "jobId": evaluation.job_id(body), "observedGeneration": body["metadata"].get("generation", 1), "lastTransitionTime": deps.now()}
    _set_status(deps, "EvaluationJob", body, {k: v for k, v in fields.items() if current.get(k) != v})


def mirror_eval_rayjob(deps: Deps, rayjob: dict | None, ns: str, name: str, cluster_gone: bool = False) -> dict:
    """Recompute an EvaluationJob's status from its RayJob (None: gone); returns the fields written."""
    evj = deps.api.get("EvaluationJob", ns, name)
    if evj is None or evj["metadata"].get("deletionTimestamp"):
        return {}
    fields = status.finetune_status(rayjob, evj.get("status"), deps.now(), cluster_gone=cluster_gone, kind="EvaluationJob")
    _set_status(deps, "EvaluationJob", evj, fields)
    return fields


def awaiting_results(current: dict, now: str) -> bool:
    """An evaluation that ended recently (a failed one may have scored some models) without results in its status."""
    if current.get("phase") not in ("Succeeded", "Failed") or current.get("results") or current.get("reason") == "InvalidSpec":
        return False
    done = current.get("lastTransitionTime")
    try:
        return not done or (_parse_time(now) - _parse_time(done)).total_seconds() <= RESULT_WINDOW_S
    except ValueError:
        return False


def check_eval(deps: Deps, body: dict) -> None:
    """Periodic: mirror the RayJob (cluster lost, RayJob gone) and, once it ended, read the scores from MLflow."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    current = body.get("status") or {}
    try:
        if awaiting_results(current, deps.now()) and deps.eval_results:
            found = deps.eval_results(body) or {}
            if found.get("results"):
                _set_status(deps, "EvaluationJob", body, {"results": found["results"]})
            return
        if status.is_terminal(current) or not current.get("rayJobName"):
            return
        rayjob = deps.api.get("RayJob", ns, current["rayJobName"])
        cluster = (rayjob or {}).get("status", {}).get("rayClusterName")
        gone = bool(cluster) and current.get("phase") == "Running" and deps.api.get("RayCluster", ns, cluster) is None
        mirror_eval_rayjob(deps, rayjob, ns, name, cluster_gone=gone)
    except (TransientApiError, RegistryError, OSError) as exc:  # API server or MLflow unreachable
        raise kopf.TemporaryError(str(exc), delay=deps.retry_delay_s) from exc


def cancel_eval(deps: Deps, body: dict, logger: logging.Logger) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    current = body.get("status") or {}
    if status.is_terminal(current):
        return
    _set_status(deps, "EvaluationJob", body, {"phase": "Cancelled", "reason": "Cancelled", "message": "cancelled by request; the Ray cluster is being removed",
                                              "lastTransitionTime": deps.now(), "completionTime": deps.now()})
    try:
        deps.api.delete("RayJob", ns, current.get("rayJobName") or name)
    except TransientApiError as exc:
        raise kopf.TemporaryError(str(exc), delay=deps.retry_delay_s) from exc
    logger.info("cancelled EvaluationJob %s/%s", ns, name)


# ---------------------------------------------------------------------------- ModelDeployment


def resolve_refs(deps: Deps, spec: Any) -> dict[str, Any]:
    """Registry lookups for the spec's references (aliases; the registry ref when the base comes from it)."""
    refs = deployment.lookup_refs(spec)
    if not refs:
        return {}
    if deps.resolve_version is None:
        raise kopf.PermanentError("this operator has no registry resolver configured, but the spec follows registry aliases")
    try:
        return {ref: deps.resolve_version(ref, spec.tracking_uri) for ref in refs}
    except RegistryError as exc:
        raise kopf.TemporaryError(f"registry lookup failed: {exc}", delay=deps.retry_delay_s * 2) from exc
    except (OSError, ConnectionError) as exc:
        raise kopf.TemporaryError(f"MLflow unreachable: {exc}", delay=deps.retry_delay_s * 2) from exc


def reconcile_deployment(deps: Deps, body: dict, logger: logging.Logger, create: bool = True) -> str:
    """Create or update the RayService; returns "created" | "serve-config" | "cluster" | "none".

    The registry poll passes create=False: creating is the create/resume handlers' job, and a
    poll racing them must not try to create a second time.
    """
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    current = dict(body.get("status") or {})
    try:
        spec = deployment.parse_serve(body)
        plan = deployment.plan_for(body, deps.cfg, resolve_refs(deps, spec))
        desired = deployment.rayservice_of(plan, body, deps.cfg)
    except (SpecError, ResolveError) as exc:
        raise _permanent(deps, "ModelDeployment", body, exc) from exc
    _polled[_key(body)] = (time.monotonic(), float(plan["registry_poll_s"]))
    try:
        existing = deps.api.get("RayService", ns, name)
        action = "created"
        if existing is None and not create:
            return "none"
        if existing is None:
            try:
                deps.api.create(desired)
            except JobError as exc:  # created meanwhile (the poll timer raced the create handler)
                if not getattr(exc, "conflict", False):
                    raise kopf.PermanentError(str(exc)) from exc
                existing = deps.api.get("RayService", ns, name)
        if existing is not None:
            action, patch = deployment.update_for(existing, desired)
            if patch:
                deps.api.patch("RayService", ns, name, patch)
        pinned = {row["source"]: str(row["version"]) for row in plan["adapters"] if row["version"] is not None and row["source"] in deployment.alias_refs(spec)}
        if plan["registry"] and plan["registry"]["version"] is not None and plan["registry"]["ref"] in deployment.alias_refs(spec):
            pinned[plan["registry"]["ref"]] = str(plan["registry"]["version"])
        fields = {"servedVersion": deployment.served_version(plan), "resolvedRefs": pinned or None,
                  "rayServiceName": name, "observedGeneration": body["metadata"].get("generation", 1)}
        if action == "created" or current.get("phase") in (None, "Failed"):
            fields.update(phase="Deploying", reason="Created", message="RayService created; waiting for the Serve application", lastTransitionTime=deps.now())
        elif action != "none":
            fields["message"] = "Serve config updated in place (same Ray cluster)" if action == "serve-config" else "cluster changed: KubeRay is rolling out a new Ray cluster"
        _set_status(deps, "ModelDeployment", body, {k: v for k, v in fields.items() if v is not None and current.get(k) != v})
    except TransientApiError as exc:
        raise kopf.TemporaryError(str(exc), delay=deps.retry_delay_s) from exc
    if action != "none":
        logger.info("RayService %s/%s: %s", ns, name, action)
    return action


# ModelDeployment -> (when its registry references were last looked up, its resolved registry_poll_s)
_polled: dict[str, tuple[float, float]] = {}


def _key(body: dict) -> str:
    return body["metadata"].get("uid") or f"{body['metadata']['namespace']}/{body['metadata']['name']}"


def poll_due(body: dict, now: float | None = None) -> bool:
    """Whether a ModelDeployment's aliases are due for re-resolution: its resolved `registry_poll_s`
    (the spec's, or the operator's LLMOP_REGISTRY_POLL_S override) since the last lookup. The timer
    ticks every `Deps.registry_poll_s`, the finest interval any deployment gets."""
    last = _polled.get(_key(body))
    return last is None or (time.monotonic() if now is None else now) - last[0] >= last[1] - 1e-3


def mirror_rayservice(deps: Deps, rayservice: dict | None, ns: str, name: str) -> None:
    md = deps.api.get("ModelDeployment", ns, name)
    if md is None or md["metadata"].get("deletionTimestamp"):
        return
    if rayservice is None and (md.get("status") or {}).get("rayServiceName"):
        fields = status._changes(md.get("status") or {}, {"phase": "Pending", "reason": "RayServiceDeleted", "message": "the RayService disappeared; recreating it"}, deps.now())
    else:
        fields = status.deployment_status(rayservice, md.get("status"), deps.now())
    _set_status(deps, "ModelDeployment", md, fields)


# ---------------------------------------------------------------------------- registration


def make_registry(deps: Deps) -> kopf.OperatorRegistry:
    """A kopf registry with every handler bound to `deps`."""
    registry = kopf.OperatorRegistry()
    has_label = lambda key: {key: kopf.PRESENT}  # noqa: E731

    @kopf.on.create(*FTJ, registry=registry, id="rayjob")
    def _ftj_create(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        create_rayjob(deps, dict(body), logger)

    @kopf.on.update(*FTJ, registry=registry, id="cancel", annotations={ANNOTATION_CANCEL: "true"})
    def _ftj_cancel(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        cancel_job(deps, dict(body), logger)

    @kopf.timer(*FTJ, registry=registry, id="health", interval=deps.check_interval_s, initial_delay=deps.check_interval_s)
    def _ftj_check(body: kopf.Body, **_: Any) -> None:
        check_job(deps, dict(body))

    @kopf.on.event("ray.io", "v1", "rayjobs", registry=registry, labels=has_label(LABEL_FINETUNE))
    def _rayjob_event(type: str, body: kopf.Body, **_: Any) -> None:
        ns, job = body["metadata"]["namespace"], body["metadata"]["labels"][LABEL_FINETUNE]
        mirror_rayjob(deps, None if type == "DELETED" else dict(body), ns, job)

    @kopf.on.create(*EVJ, registry=registry, id="rayjob")
    def _evj_create(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        create_eval_rayjob(deps, dict(body), logger)

    @kopf.on.update(*EVJ, registry=registry, id="cancel", annotations={ANNOTATION_CANCEL: "true"})
    def _evj_cancel(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        cancel_eval(deps, dict(body), logger)

    @kopf.timer(*EVJ, registry=registry, id="health", interval=deps.check_interval_s, initial_delay=deps.check_interval_s)
    def _evj_check(body: kopf.Body, **_: Any) -> None:
        check_eval(deps, dict(body))

    @kopf.on.event("ray.io", "v1", "rayjobs", registry=registry, labels=has_label(LABEL_EVALUATION))
    def _eval_rayjob_event(type: str, body: kopf.Body, **_: Any) -> None:
        ns, job = body["metadata"]["namespace"], body["metadata"]["labels"][LABEL_EVALUATION]
        mirror_eval_rayjob(deps, None if type == "DELETED" else dict(body), ns, job)

    @kopf.on.create(*MDEP, registry=registry, id="rayservice-create")
    @kopf.on.update(*MDEP, registry=registry, id="rayservice-update", field="spec")
    @kopf.on.resume(*MDEP, registry=registry, id="rayservice-resume")
    def _md_reconcile(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        reconcile_deployment(deps, dict(body), logger)

    @kopf.timer(*MDEP, registry=registry, id="registry-poll", interval=deps.registry_poll_s, initial_delay=deps.registry_poll_s)
    def _md_poll(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        if poll_due(dict(body)):
            reconcile_deployment(deps, dict(body), logger, create=False)

    @kopf.on.event("ray.io", "v1", "rayservices", registry=registry, labels=has_label(LABEL_DEPLOYMENT))
    def _rayservice_event(type: str, body: kopf.Body, **_: Any) -> None:
        ns, name = body["metadata"]["namespace"], body["metadata"]["labels"][LABEL_DEPLOYMENT]
        mirror_rayservice(deps, None if type == "DELETED" else dict(body), ns, name)

    return registry


def configure(settings: kopf.OperatorSettings) -> None:
    """Keep kopf's bookkeeping in annotations: our status schema is closed (no `status.kopf`).

    The prefix differs from our own annotations' (`llmplatform.io/cancel`): kopf leaves
    annotations under its prefix out of the diff, and a cancel must count as a change.
    """
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"kopf.{GROUP}")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=f"kopf.{GROUP}", key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/timers"  # kopf's, so timers stop before deletion
    settings.background.cancellation_polling = 2  # s; the 60 s default holds a deletion a minute
    settings.posting.level = logging.WARNING

