"""KubeRay status -> our status (pure).

`finetune_status` maps a RayJob's status onto a FineTuneJob phase, and makes the failure modes
KubeRay is known to leave hanging end in a terminal phase: the submitter pod failing
(`SubmissionFailed`), `jobStatus: FAILED` while `jobDeploymentStatus` still says Running, the Ray
cluster disappearing mid-run, the RayJob itself vanishing, and `activeDeadlineSeconds` passing.
A terminal phase is sticky: later events (the cluster shut down after success, the RayJob's TTL
deletion) don't rewrite it; an EvaluationJob's RayJob maps the same way (`kind`), in its own words.
`deployment_status` does the same for RayService -> ModelDeployment.
Each returns only the status fields that change, so an unchanged status costs no API call.
"""

from __future__ import annotations

from typing import Any, Mapping

from llmplatform.kube import SERVE_PORT, serve_service

TERMINAL = {"Succeeded", "Failed", "Cancelled"}


def _changes(current: Mapping[str, Any], wanted: Mapping[str, Any], now: str) -> dict:
    out = {k: v for k, v in wanted.items() if v is not None and current.get(k) != v}
    if "phase" in out:
        out["lastTransitionTime"] = now
        if out["phase"] in TERMINAL and not current.get("completionTime") and "completionTime" not in out:
            out["completionTime"] = now
    return out


def is_terminal(status: Mapping[str, Any] | None) -> bool:
    return bool(status) and status.get("phase") in TERMINAL  # type: ignore[union-attr]


def _failed(reason: str, message: str) -> dict:
    return {"phase": "Failed", "reason": reason, "message": message}


RESUBMIT = "resubmit the FineTuneJob with the same name and spec to resume from its last checkpoint"
# What a user reads for each kind of job a RayJob runs: success, the app failing, running.
WORDS = {
    "FineTuneJob": {"done": "training finished; the adapter is in MLflow", "running": "training",
                    "failed": "the training job failed{tail}; see `platformctl finetune logs {name} --target k8s`", "resubmit": RESUBMIT},
    "EvaluationJob": {"done": "evaluation finished; the scores are in MLflow (status.results)", "running": "evaluating",
                      "failed": "the evaluation job failed{tail}; see `kubectl logs -l job-name={name}`",
                      "resubmit": "delete the EvaluationJob and apply it again to rerun it"},
}


def _classify(rayjob: Mapping[str, Any], cluster_gone: bool, resume: str, kind: str = "FineTuneJob") -> dict:
    spec = rayjob.get("spec") or {}
    st = rayjob.get("status") or {}
    jds = st.get("jobDeploymentStatus") or ""
    js = st.get("jobStatus") or ""
    reason = st.get("reason") or ""
    kuberay_msg = st.get("message") or ""
    name = rayjob["metadata"]["name"]
    tail = f": {kuberay_msg}" if kuberay_msg else ""

    words = WORDS[kind]
    if js == "SUCCEEDED":
        return {"phase": "Succeeded", "reason": "JobSucceeded", "message": words["done"]}
    if js == "FAILED":  # also while jobDeploymentStatus is still Running: don't wait for it
        return _failed("AppFailed", words["failed"].format(tail=tail, name=name))
    if js == "STOPPED":
        return {"phase": "Cancelled", "reason": "JobStopped", "message": f"the Ray job was stopped{tail}"}
    if jds == "Failed" or reason:
        if reason == "DeadlineExceeded":
            limit = spec.get("activeDeadlineSeconds")
            return _failed("DeadlineExceeded", f"the job ran past activeDeadlineSeconds={limit}; raise the `llmplatform.io/active-deadline-seconds` annotation or shorten the run")
        if reason == "SubmissionFailed":
            return _failed("SubmissionFailed", f"the job submitter pod failed{tail}; see `kubectl logs -l job-name={name}` (often an image or entrypoint error)")
        if jds == "Failed":
            return _failed(reason or "RayJobFailed", f"KubeRay marked the RayJob failed{tail}")
    if jds == "Complete":
        return _failed("NoJobStatus", f"KubeRay completed the RayJob without a Ray job result{tail}; the submitter most likely failed")
    if cluster_gone:
        cluster = st.get("rayClusterName") or "its RayCluster"
        return _failed("ClusterLost", f"Ray cluster {cluster} disappeared while the job was running (node loss or manual deletion); {resume}")
    if jds in ("Suspended", "Suspending"):
        return {"phase": "Pending", "reason": "Suspended", "message": "the RayJob is suspended (queued by Kueue or paused)"}
    if jds in ("", "New", "Waiting", "Scheduling", "Scheduled"):
        return {"phase": "Pending", "reason": "Waiting", "message": "waiting for KubeRay to create the Ray cluster"}
    if jds == "Initializing":
        return {"phase": "Initializing", "reason": "ClusterStarting", "message": "the Ray cluster is starting (pulling images, scheduling GPU pods)"}
    if jds == "Retrying":
        return {"phase": "Running", "reason": "Retrying", "message": f"KubeRay is retrying on a new cluster after a failure (failed={st.get('failed', 0)})"}
    if js in ("", "PENDING"):
        return {"phase": "Running", "reason": "JobPending", "message": "the Ray job is submitted and waiting for workers"}
    return {"phase": "Running", "reason": "JobRunning", "message": words["running"]}


def finetune_status(rayjob: Mapping[str, Any] | None, current: Mapping[str, Any] | None, now: str, *, cluster_gone: bool = False,
                    resume: str | None = None, kind: str = "FineTuneJob") -> dict:
    """Status fields of a FineTuneJob (or `kind` EvaluationJob) that change given its RayJob (None: the RayJob is gone).

    `resume`: how to resume this job after a lost cluster (`finetune.resume_advice`), put in the
    ClusterLost and RayJobDeleted messages."""
    resume = resume or WORDS[kind]["resubmit"]
    current = current or {}
    if is_terminal(current):
        return {}
    if rayjob is None:
        if not current.get("rayJobName"):
            return {}
        wanted = _failed("RayJobDeleted", f"RayJob {current['rayJobName']} was deleted before the job finished; {resume}")
        return _changes(current, wanted, now)
    st = rayjob.get("status") or {}
    wanted = _classify(rayjob, cluster_gone, resume, kind)
    wanted.update({
        "rayJobName": rayjob["metadata"]["name"],
        "rayJobId": st.get("jobId"),
        "rayClusterName": st.get("rayClusterName"),
        "dashboardURL": st.get("dashboardURL"),
        "startTime": st.get("startTime"),
    })
    if wanted["phase"] in TERMINAL and st.get("endTime"):
        wanted["completionTime"] = st["endTime"]
    return _changes(current, wanted, now)


def progress_text(step: int | None, total: int | None) -> str | None:
    """`120/500 steps (24%)` from step counters; None when nothing is known."""
    if step is None:
        return None
    if not total:
        return f"{step} steps"
    return f"{step}/{total} steps ({int(100 * step / total)}%)"


def deployment_status(rayservice: Mapping[str, Any] | None, current: Mapping[str, Any] | None, now: str) -> dict:
    """Status fields of a ModelDeployment that change given its RayService (None: not created yet)."""
    current = current or {}
    if rayservice is None:
        return _changes(current, {"phase": "Pending", "reason": "Creating", "message": "creating the RayService"}, now)
    st = rayservice.get("status") or {}
    conditions = {c.get("type"): c for c in st.get("conditions") or []}
    ready = conditions.get("Ready", {})
    upgrading = conditions.get("UpgradeInProgress", {})
    service_status = st.get("serviceStatus") or ""
    if upgrading.get("status") == "True":
        wanted = {"phase": "Updating", "reason": upgrading.get("reason") or "Upgrading", "message": upgrading.get("message") or "KubeRay is rolling out a new Ray cluster"}
    elif ready.get("status") == "True" or service_status == "Running":
        wanted = {"phase": "Ready", "reason": "ServeReady", "message": "serving"}
    elif ready.get("status") == "False" and ready.get("reason") not in (None, "", "Initializing", "RayServiceInitializing"):
        wanted = {"phase": "Unhealthy", "reason": ready.get("reason"), "message": ready.get("message") or "the Serve application is unhealthy"}
    else:
        wanted = {"phase": "Deploying", "reason": "Deploying", "message": "the Ray cluster and Serve application are starting"}
    wanted["serviceStatus"] = service_status or None
    name = rayservice["metadata"]["name"]
    ns = rayservice["metadata"].get("namespace", "default")
    wanted["endpoint"] = f"http://{serve_service(name)}.{ns}.svc:{SERVE_PORT}"
    wanted["rayServiceName"] = name
    active = (st.get("activeServiceStatus") or {}).get("rayClusterName")
    wanted["rayClusterName"] = active
    return _changes(current, wanted, now)


# ---------------------------------------------------------------------------- conditions
# metav1.Condition lists derived from the phase, so `kubectl wait --for=condition=Succeeded` and
# Argo CD's health check (manifests/argocd/health) read one documented shape. Every type is always
# present (True/False), so a waiter never sees a missing condition as "not yet".

CONDITION_TYPES = {"FineTuneJob": ("Running", "Succeeded", "Failed"), "EvaluationJob": ("Running", "Succeeded", "Failed"),
                   "ModelDeployment": ("Ready", "Progressing", "Degraded")}

# phase -> the condition types that are "True" in it (every other type is "False")
_TRUE_IN = {
    "FineTuneJob": {"Pending": (), "Initializing": (), "Running": ("Running",), "Succeeded": ("Succeeded",), "Failed": ("Failed",), "Cancelled": ()},
    "EvaluationJob": {"Pending": (), "Initializing": (), "Running": ("Running",), "Succeeded": ("Succeeded",), "Failed": ("Failed",), "Cancelled": ()},
    "ModelDeployment": {"Pending": ("Progressing",), "Deploying": ("Progressing",), "Updating": ("Progressing",), "Ready": ("Ready",),
                        "Unhealthy": ("Degraded",), "Failed": ("Degraded",)},
}


def conditions_for(kind: str, merged: Mapping[str, Any], generation: int, now: str) -> list[dict] | None:
    """The full `status.conditions` list for a status (its phase/reason/message); None without a phase.

    A condition whose status is unchanged keeps its lastTransitionTime (reason and message may
    move on); a flipped one gets `now`. While a ModelDeployment updates, Ready stays as it was:
    KubeRay keeps the old cluster serving until the new one is ready.
    """
    phase = merged.get("phase")
    if phase not in _TRUE_IN[kind]:
        return None
    reason, message = merged.get("reason") or phase, merged.get("message") or ""
    old = {c.get("type"): c for c in merged.get("conditions") or []}
    true = set(_TRUE_IN[kind][phase])
    if kind == "ModelDeployment" and phase == "Updating" and old.get("Ready", {}).get("status") == "True":
        true.add("Ready")
    out = []
    for ctype in CONDITION_TYPES[kind]:
        cond = {"type": ctype, "status": "True" if ctype in true else "False", "reason": reason, "message": message or phase}
        if ctype == "Ready" and phase == "Updating" and ctype in true:
            cond.update(reason="ServingPreviousCluster", message="the previous Ray cluster serves until the new one is ready")
        previous = old.get(ctype) or {}
        kept = previous.get("status") == cond["status"] and previous.get("lastTransitionTime")
        out.append({**cond, "lastTransitionTime": kept or now, "observedGeneration": generation})
    return out


def with_conditions(kind: str, current: Mapping[str, Any] | None, fields: Mapping[str, Any], generation: int, now: str) -> dict:
    """`fields` (a status patch) plus the full `conditions` list when they change.

    A merge patch replaces a list whole, so the list is always written complete. An unchanged
    status stays an empty patch. `generation`: the CR generation the status reflects.
    """
    current = current or {}
    merged = {**current, **fields}
    wanted = conditions_for(kind, merged, int(fields.get("observedGeneration") or current.get("observedGeneration") or generation or 1), now)
    out = dict(fields)
    if wanted is not None and wanted != current.get("conditions"):
        out["conditions"] = wanted
    return out
