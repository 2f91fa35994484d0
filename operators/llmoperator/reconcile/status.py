"""KubeRay status -> our status (pure).

`finetune_status` maps a RayJob's status onto a FineTuneJob phase, and makes the failure modes
KubeRay is known to leave hanging end in a terminal phase: the submitter pod failing
(`SubmissionFailed`), `jobStatus: FAILED` while `jobDeploymentStatus` still says Running, the Ray
cluster disappearing mid-run, the RayJob itself vanishing, and `activeDeadlineSeconds` passing.
A terminal phase is sticky: later events (the cluster shut down after success, the RayJob's TTL
deletion) don't rewrite it. `deployment_status` does the same for RayService -> ModelDeployment.
Each returns only the status fields that change, so an unchanged status costs no API call.
"""

from __future__ import annotations

from typing import Any, Mapping

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


def _classify(rayjob: Mapping[str, Any], cluster_gone: bool) -> dict:
    spec = rayjob.get("spec") or {}
    st = rayjob.get("status") or {}
    jds = st.get("jobDeploymentStatus") or ""
    js = st.get("jobStatus") or ""
    reason = st.get("reason") or ""
    kuberay_msg = st.get("message") or ""
    name = rayjob["metadata"]["name"]
    tail = f": {kuberay_msg}" if kuberay_msg else ""

    if js == "SUCCEEDED":
        return {"phase": "Succeeded", "reason": "JobSucceeded", "message": "training finished; the adapter is in MLflow"}
    if js == "FAILED":  # also while jobDeploymentStatus is still Running: don't wait for it
        return _failed("AppFailed", f"the training job failed{tail}; see `platformctl finetune logs {name} --target k8s`")
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
        return _failed("ClusterLost", f"Ray cluster {cluster} disappeared while the job was running (node loss or manual deletion); resubmit to resume from the last checkpoint")
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
    return {"phase": "Running", "reason": "JobRunning", "message": "training"}


def finetune_status(rayjob: Mapping[str, Any] | None, current: Mapping[str, Any] | None, now: str, *, cluster_gone: bool = False) -> dict:
    """Status fields of a FineTuneJob that change given its RayJob (None: the RayJob is gone)."""
    current = current or {}
    if is_terminal(current):
        return {}
    if rayjob is None:
        if not current.get("rayJobName"):
            return {}
        wanted = _failed("RayJobDeleted", f"RayJob {current['rayJobName']} was deleted before the job finished; resubmit the FineTuneJob")
        return _changes(current, wanted, now)
    st = rayjob.get("status") or {}
    wanted = _classify(rayjob, cluster_gone)
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
    wanted["endpoint"] = f"http://{name}-serve-svc.{ns}.svc:8000"
    wanted["rayServiceName"] = name
    active = (st.get("activeServiceStatus") or {}).get("rayClusterName")
    wanted["rayClusterName"] = active
    return _changes(current, wanted, now)
