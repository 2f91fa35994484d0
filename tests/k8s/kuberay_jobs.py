"""KubeRay's RayJob controller, played against kmock with real local Ray clusters.

`RayJobHarness(api_url, workdir, namespaces)` polls the RayJobs in kmock. For each new one it does
what KubeRay v1.x's rayjob controller does (statuses from apis/ray/v1/rayjob_types.go):

1. creates a RayCluster object `<rayjob>-<5 chars>` (owned by the RayJob, spec = rayClusterSpec),
   sets `jobId` (`<rayjob>-<5 chars>`), `rayClusterName`, `startTime` and
   `jobDeploymentStatus: Initializing`;
2. starts a `kuberay_cluster.LocalRayCluster` from the spec; when the head answers, sets
   `dashboardURL`, the RayCluster's `state: ready`, and `jobDeploymentStatus: Running`;
3. submits `spec.entrypoint` with `spec.runtimeEnvYAML`, `spec.metadata` and the entrypoint
   resources through the Ray Jobs REST API (what KubeRay's dashboard client posts; the harness
   does it directly instead of from a K8sJobMode submitter pod), with `submission_id = jobId`;
4. mirrors `jobStatus` (PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED) and `message`; at the end sets
   `endTime`, `succeeded`/`failed` and `jobDeploymentStatus: Complete` (or `Failed`, reason
   `AppFailed`); past `activeDeadlineSeconds` it stops the job: `Failed`, reason `DeadlineExceeded`;
5. honours `shutdownAfterJobFinishes`: after `ttlSecondsAfterFinished` it stops the cluster and
   deletes the RayCluster object.

A RayJob that disappears (deleted, or garbage-collected with its owner) has its Ray job stopped,
its cluster stopped and its RayCluster deleted. The harness plays the garbage collector for the
objects it manages: a RayJob whose owner (by uid) is gone is deleted. A cluster whose head dies
underneath (`LocalRayCluster.kill()`, a node loss) is played as a lost cluster: its RayCluster
object is deleted and the RayJob is left as KubeRay would leave it (not terminal).
Not played: pod scheduling, image pulls, retries on a new cluster (`backoffLimit`), suspension.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from kuberay_cluster import LocalRayCluster

log = logging.getLogger("kuberay-harness")
TERMINAL_JOB = {"SUCCEEDED", "FAILED", "STOPPED"}
HF_TEST_TOKEN = "hf_kuberay_harness_test"  # in the Secret llm-platform-hf-token that operator_mlflow creates
KUBERAY_NAMESPACES = ("ml-team",)  # where the tests that use the harness put their CRs (operator_mlflow makes its Secret there)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _suffix() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))


def submission_body(rayjob: dict, job_id: str) -> dict:
    """The Jobs API request KubeRay builds from a RayJob spec."""
    spec = rayjob["spec"]
    body: dict[str, Any] = {"entrypoint": spec["entrypoint"], "submission_id": job_id}
    if spec.get("runtimeEnvYAML"):
        body["runtime_env"] = yaml.safe_load(spec["runtimeEnvYAML"])
    if spec.get("metadata"):
        body["metadata"] = dict(spec["metadata"])
    for key, api_key in (("entrypointNumCpus", "entrypoint_num_cpus"), ("entrypointNumGpus", "entrypoint_num_gpus")):
        if spec.get(key):
            body[api_key] = spec[key]
    if spec.get("entrypointResources"):
        body["entrypoint_resources"] = json.loads(spec["entrypointResources"])
    return body


@dataclass
class JobRun:
    """One RayJob being played: its cluster, Ray job and what happened."""

    namespace: str
    name: str
    uid: str
    cluster_name: str
    job_id: str
    cluster: LocalRayCluster | None = None
    error: str | None = None  # why the cluster could not start (e.g. a missing Secret)
    lost: bool = False
    finished: bool = False
    torn_down: bool = False
    history: list[str] = field(default_factory=list)  # jobDeploymentStatus/jobStatus transitions written
    submitted: dict | None = None  # the Jobs API request sent
    thread: threading.Thread | None = None
    stop_flag: threading.Event = field(default_factory=threading.Event)

    # ---------------------------------------------------------------- Jobs API (REST, with the cluster's token)

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0) -> Any:
        assert self.cluster is not None
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.cluster.dashboard_url + path, data=data, method=method,
                                     headers={**self.cluster.auth_headers(), "Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()

    def job_info(self) -> dict:
        return self._request("GET", f"/api/jobs/{self.job_id}")

    def logs(self) -> str:
        """The Ray job's driver log (what `ray job logs` shows)."""
        return self._request("GET", f"/api/jobs/{self.job_id}/logs")["logs"]

    def stop_job(self) -> None:
        try:
            self._request("POST", f"/api/jobs/{self.job_id}/stop")
        except (OSError, ValueError):
            pass


class RayJobHarness:
    """Plays KubeRay's RayJob controller (see the module docstring) from a background thread."""

    def __init__(self, api_url: str, workdir: Path, namespaces: tuple[str, ...] = KUBERAY_NAMESPACES, poll_s: float = 0.5):
        self.api_url, self.workdir, self.namespaces, self.poll_s = api_url, Path(workdir), namespaces, poll_s
        self.runs: dict[str, JobRun] = {}  # RayJob uid -> run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kuberay-rayjobs", daemon=True)
        self._lock = threading.Lock()

    def _api(self) -> Any:
        from llmplatform.kube import connect

        return connect(host=self.api_url)

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> "RayJobHarness":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        for run in list(self.runs.values()):
            self.teardown(run, self._api(), delete_cluster_object=False)

    def run_for(self, name: str, namespace: str = "default", timeout: float = 30.0) -> JobRun:
        """The newest run of the RayJob `name` (waits for the harness to pick it up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [r for r in self.runs.values() if r.name == name and r.namespace == namespace]
            if found:
                return found[-1]
            time.sleep(0.2)
        raise AssertionError(f"the harness never saw RayJob {namespace}/{name}")

    # ---------------------------------------------------------------- the controller loop

    def _loop(self) -> None:
        api = self._api()
        while not self._stop.is_set():
            try:
                self._sync(api)
            except Exception:  # a controller keeps going; the test sees the effect (or its absence)
                log.exception("RayJob harness sync failed")
            self._stop.wait(self.poll_s)

    def _sync(self, api: Any) -> None:
        present: set[str] = set()
        for ns in self.namespaces:
            for rayjob in api.list("RayJob", ns):
                meta = rayjob["metadata"]
                if meta.get("deletionTimestamp"):
                    continue
                if self._owner_gone(api, rayjob):
                    api.delete("RayJob", ns, meta["name"])  # the garbage collector's cascade
                    continue
                present.add(meta["uid"])
                if meta["uid"] not in self.runs:
                    self._begin(rayjob)
        for uid, run in list(self.runs.items()):
            if uid not in present and not run.torn_down:
                log.info("RayJob %s/%s is gone: stopping its Ray job and cluster", run.namespace, run.name)
                self.teardown(run, api)

    def _owner_gone(self, api: Any, obj: dict) -> bool:
        for owner in obj["metadata"].get("ownerReferences") or []:
            if owner.get("kind") in ("FineTuneJob", "ModelDeployment"):
                found = api.get(owner["kind"], obj["metadata"]["namespace"], owner["name"])
                if found is None or found["metadata"].get("uid") != owner.get("uid"):
                    return True
        return False

    def _begin(self, rayjob: dict) -> None:
        meta = rayjob["metadata"]
        run = JobRun(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"],
                     cluster_name=f"{meta['name']}-{_suffix()}", job_id=f"{meta['name']}-{_suffix()}")
        with self._lock:
            self.runs[meta["uid"]] = run
        run.thread = threading.Thread(target=self._play, args=(run, rayjob), name=f"rayjob-{run.name}", daemon=True)
        run.thread.start()

    # ---------------------------------------------------------------- one RayJob

    def _status(self, api: Any, run: JobRun, fields: dict) -> None:
        if run.torn_down:
            return
        label = fields.get("jobDeploymentStatus") or fields.get("jobStatus")
        if label:
            run.history.append(f"{fields.get('jobDeploymentStatus', '')}/{fields.get('jobStatus', '')}")
        try:
            api.patch_status("RayJob", run.namespace, run.name, fields)
        except Exception as exc:  # the RayJob was deleted meanwhile
            log.info("RayJob %s status not written: %s", run.name, exc)

    def _play(self, run: JobRun, rayjob: dict) -> None:
        api = self._api()
        spec = rayjob["spec"]
        started = time.monotonic()
        try:
            api.create({
                "apiVersion": "ray.io/v1", "kind": "RayCluster",
                "metadata": {"name": run.cluster_name, "namespace": run.namespace,
                             "labels": {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": run.name},
                             "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayJob", "name": run.name, "uid": run.uid,
                                                  "controller": True, "blockOwnerDeletion": True}]},
                "spec": spec["rayClusterSpec"],
            })
            self._status(api, run, {"jobId": run.job_id, "rayClusterName": run.cluster_name, "startTime": now(),
                                    "jobDeploymentStatus": "Initializing", "jobStatus": ""})
            try:
                run.cluster = LocalRayCluster.start(spec["rayClusterSpec"], run.namespace, api, self.workdir, name=run.cluster_name)
            except Exception as exc:  # pods that never start: KubeRay leaves the RayJob Initializing
                run.error = f"{type(exc).__name__}: {exc}"
                log.warning("RayCluster %s did not start: %s", run.cluster_name, run.error)
                return
            if run.torn_down or run.stop_flag.is_set():
                run.cluster.stop()
                return
            api.patch_status("RayCluster", run.namespace, run.cluster_name, {"state": "ready", "readyWorkerReplicas": len(run.cluster.nodes) - 1})
            self._status(api, run, {"dashboardURL": run.cluster.dashboard_url.removeprefix("http://"), "jobDeploymentStatus": "Running"})
            run.submitted = submission_body(rayjob, run.job_id)
            run._request("POST", "/api/jobs/", run.submitted)
            self._watch(api, run, spec, started)
        except Exception:
            log.exception("playing RayJob %s failed", run.name)

    def _watch(self, api: Any, run: JobRun, spec: dict, started: float) -> None:
        assert run.cluster is not None
        last = None
        deadline = spec.get("activeDeadlineSeconds")
        while not run.stop_flag.is_set():
            if not run.cluster.alive():
                run.lost = True
                log.warning("the head of %s died: deleting RayCluster %s (a lost cluster)", run.name, run.cluster_name)
                run.cluster.kill()
                api.delete("RayCluster", run.namespace, run.cluster_name)
                return
            if deadline and time.monotonic() - started > deadline:
                run.stop_job()
                self._status(api, run, {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "endTime": now(), "failed": 1,
                                        "message": f"the RayJob has passed the activeDeadlineSeconds={deadline}"})
                break
            try:
                info = run.job_info()
            except (OSError, ValueError) as exc:  # dashboard busy or restarting: KubeRay requeues
                log.info("job info of %s: %s", run.job_id, exc)
                run.stop_flag.wait(1.0)
                continue
            status = info.get("status") or "PENDING"
            if status != last:
                fields: dict[str, Any] = {"jobStatus": status}
                if info.get("message"):
                    fields["message"] = info["message"][:2000]
                if status in TERMINAL_JOB:
                    ok = status == "SUCCEEDED"
                    fields.update({"endTime": now(), "jobDeploymentStatus": "Complete" if ok else "Failed",
                                   ("succeeded" if ok else "failed"): 1})
                    if not ok:
                        fields["reason"] = "AppFailed"
                self._status(api, run, fields)
                last = status
            if status in TERMINAL_JOB:
                break
            run.stop_flag.wait(1.0)
        run.finished = True
        if spec.get("shutdownAfterJobFinishes") and not run.stop_flag.is_set():
            run.stop_flag.wait(float(spec.get("ttlSecondsAfterFinished") or 0))
            if not run.torn_down:
                self.teardown(run, api)

    def teardown(self, run: JobRun, api: Any, delete_cluster_object: bool = True) -> None:
        """Stop the Ray job and every process of the cluster, delete the RayCluster object."""
        if run.torn_down:
            return
        run.torn_down = True
        run.stop_flag.set()
        if run.cluster is not None:
            if run.cluster.alive() and not run.finished:
                run.stop_job()
            run.cluster.stop()
        elif run.thread is not None and run.thread is not threading.current_thread():
            run.thread.join(150)  # a cluster still starting: _play stops it once started
            if run.cluster is not None:
                run.cluster.stop()
        if delete_cluster_object:
            try:
                api.delete("RayCluster", run.namespace, run.cluster_name)
            except Exception as exc:
                log.info("RayCluster %s not deleted: %s", run.cluster_name, exc)
