"""KubeRay's RayService controller, played against kmock with real local Ray clusters.

`KubeRayServe(api, namespace, workdir)` (a context manager: a background thread) watches the
RayServices of one namespace by polling and, for each, does what KubeRay 1.7's rayservice
controller does, with real processes:

- creates a RayCluster object `<name>-raycluster-<5 hex>` (owned by the RayService) and starts a
  `LocalRayCluster` (tests/k8s/kuberay_cluster.py) from `spec.rayClusterConfig`; until its Serve
  applications run it is the *pending* cluster, then it becomes the *active* one;
- deploys `spec.serveConfigV2` through Ray Serve's declarative REST API on the head's dashboard
  (`PUT /api/serve/applications/`, token in `x-ray-authorization`, as KubeRay's dashboard client
  does) and re-deploys it on the same cluster when it changes (KubeRay's in-place update);
- reads `GET /api/serve/applications/` and writes the RayService status KubeRay writes:
  `serviceStatus`, `numServeEndpoints`, conditions `Ready` / `UpgradeInProgress`,
  `activeServiceStatus` / `pendingServiceStatus` with `rayClusterName` and `applicationStatuses`;
- a changed `rayClusterConfig` starts a new pending cluster with the current serve config and
  switches to it once its applications run (KubeRay's NewCluster upgrade; the old one is stopped
  at once instead of after `rayClusterDeletionDelaySeconds`);
- a deleted RayService, or one whose owner (a ModelDeployment) is gone, has its applications
  deleted and its cluster stopped (the harness plays the garbage collector for owners).

What the pod network and filesystem give a real head, the serve config gets here: the Serve
HTTP proxy listens on `127.0.0.1:<serve_port>` (the head's `serve` containerPort 8000, mapped
to a free port; proxies on the head only, as the cluster's raylets share one loopback), and
string values in the config that are paths under one of the head's volume mounts are mapped to
the head pod's local directory (Secret/ConfigMap volumes have the same files in every pod).
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml

log = logging.getLogger("kuberay-serve")
SERVE_API = "/api/serve/applications/"  # KubeRay's DeployPathV2 and ServeDetailsPath
AUTH_HEADER = "x-ray-authorization"  # what KubeRay's dashboard client sends the token in


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- pure: config and status


def map_config_paths(node: Any, local_path) -> Any:
    """`node` (a parsed serve config) with every string that `local_path` maps replaced by the local path."""
    if isinstance(node, dict):
        return {k: map_config_paths(v, local_path) for k, v in node.items()}
    if isinstance(node, list):
        return [map_config_paths(v, local_path) for v in node]
    if isinstance(node, str) and node.startswith("/"):
        try:
            return str(local_path(node))
        except KeyError:
            return node
    return node


def deploy_body(serve_config_v2: str, serve_port: int, local_path=None) -> dict:
    """The JSON KubeRay PUTs to `/api/serve/applications/` for `serveConfigV2`, plus the head's
    port mapping: the HTTP proxy on 127.0.0.1:`serve_port`, on the head only."""
    doc = yaml.safe_load(serve_config_v2 or "") or {}
    if local_path is not None:
        doc = map_config_paths(doc, local_path)
    doc["http_options"] = {**(doc.get("http_options") or {}), "host": "127.0.0.1", "port": int(serve_port)}
    doc["proxy_location"] = "HeadOnly"
    return doc


def application_statuses(details: Mapping[str, Any]) -> dict:
    """KubeRay's `applicationStatuses` from Serve's details (ConvertServeDetailsToApplicationStatuses)."""
    out = {}
    for name, app in (details.get("applications") or {}).items():
        deployments = {d: {"status": dep.get("status", ""), "message": dep.get("message", "")}
                       for d, dep in (app.get("deployments") or {}).items()}
        out[name] = {"status": app.get("status", ""), "message": app.get("message", ""), "serveDeploymentStatuses": deployments}
    return out


def all_running(apps: Mapping[str, Any], wanted: list[str]) -> bool:
    """Every application of the serve config is RUNNING (KubeRay's getAndCheckServeStatus)."""
    return bool(wanted) and all((apps.get(n) or {}).get("status") == "RUNNING" for n in wanted)


def set_condition(conditions: list[dict], type_: str, status: str, reason: str, message: str, generation: int, now: str) -> list[dict]:
    """meta.SetStatusCondition: lastTransitionTime moves only when `status` changes."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    out.append({"type": type_, "status": status, "reason": reason, "message": message,
                "lastTransitionTime": since, "observedGeneration": generation})
    return sorted(out, key=lambda c: c["type"])


def service_status(current: Mapping[str, Any], *, generation: int, active: dict | None, pending: dict | None,
                   endpoints: int, now: str) -> dict:
    """The RayService status KubeRay 1.7 computes (calculateStatus + calculateConditions).

    `active` / `pending`: {"rayClusterName", "applicationStatuses"} of the active / pending cluster."""
    conditions = list(current.get("conditions") or [])
    if not conditions:
        msg = "RayService is initializing"
        conditions = set_condition(conditions, "Ready", "False", "Initializing", msg, generation, now)
        conditions = set_condition(conditions, "UpgradeInProgress", "False", "Initializing", msg, generation, now)
    ready = next(c for c in conditions if c["type"] == "Ready")
    if endpoints > 0:
        conditions = set_condition(conditions, "Ready", "True", "NonZeroServeEndpoints", "Number of serve endpoints is greater than 0", generation, now)
    elif ready["status"] == "True":
        conditions = set_condition(conditions, "Ready", "False", "ZeroServeEndpoints", "Number of serve endpoints dropped to 0", generation, now)
    if active and pending:
        conditions = set_condition(conditions, "UpgradeInProgress", "True", "BothActivePendingClustersExist", "Both active and pending Ray clusters exist", generation, now)
    elif active:
        conditions = set_condition(conditions, "UpgradeInProgress", "False", "NoPendingCluster", "Active Ray cluster exists and no pending Ray cluster", generation, now)
    is_ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return {
        "conditions": conditions,
        "serviceStatus": "Running" if is_ready else "",
        "numServeEndpoints": endpoints,
        "observedGeneration": generation,
        "lastUpdateTime": now,
        "activeServiceStatus": dict(active) if active else None,  # None: removed by the merge patch
        "pendingServiceStatus": dict(pending) if pending else None,
    }


def put_secret(api: Any, namespace: str, name: str, data: Mapping[str, str]) -> None:
    """Create an Opaque Secret in kmock (what `kubectl create secret generic` does)."""
    import base64

    from kubernetes import client

    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    client.CoreV1Api(api._client).create_namespaced_secret(namespace, body)


# ---------------------------------------------------------------------------- the dashboard's REST API


def _token(cluster: Any) -> str:
    return Path(cluster.token_path).read_text().strip()  # the cluster's Ray token (KubeRay reads it from a Secret)


def dashboard_call(cluster: Any, method: str, body: dict | None = None, timeout: float = 30.0) -> dict:
    """One call to the head's Serve REST API with the head's token; returns the JSON answer ({} if none)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(cluster.dashboard_url + SERVE_API, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    req.add_header(AUTH_HEADER, f"Bearer {_token(cluster)}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, whatever *_proxy says
    with opener.open(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else {}


def proxy_healthy(serve_port: int) -> bool:
    """Serve's proxy on the head answers its health route (what KubeRay's serve Service endpoints track)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{serve_port}/-/healthz", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


# ---------------------------------------------------------------------------- the controller


@dataclass
class ServeCluster:
    """One RayCluster of a RayService: its local Ray cluster and what was deployed on it."""

    name: str
    spec: dict
    local: Any  # LocalRayCluster
    deployed: str | None = None  # the serveConfigV2 last PUT
    apps: dict = field(default_factory=dict)

    def view(self) -> dict:
        return {"rayClusterName": self.name, "applicationStatuses": self.apps}


@dataclass
class ServiceState:
    uid: str
    active: ServeCluster | None = None
    pending: ServeCluster | None = None
    history: list[ServeCluster] = field(default_factory=list)  # every cluster it started (tests check they stopped)


class KubeRayServe:
    """KubeRay's RayService controller for one namespace (see the module docstring)."""

    def __init__(self, api: Any, namespace: str, workdir: Path, poll_s: float = 0.5) -> None:
        self.api, self.namespace, self.workdir, self.poll_s = api, namespace, Path(workdir), poll_s
        self.services: dict[str, ServiceState] = {}
        self.stopped: dict[str, ServiceState] = {}  # torn-down services, for tests to inspect
        self.errors: list[str] = []
        self.deploys: list[tuple[str, str]] = []  # (RayService, RayCluster) per PUT, in order
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="kuberay-serve", daemon=True)

    # -- lifecycle

    def __enter__(self) -> "KubeRayServe":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(120)
        with self._lock:
            for name in list(self.services):
                self._teardown(name)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.reconcile_all()
            except Exception as exc:  # a harness bug or a dead cluster: recorded for the tests, retried
                log.exception("RayService reconcile failed")
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_s)

    # -- reconcile

    def reconcile_all(self) -> None:
        seen = set()
        for rs in self.api.list("RayService", self.namespace):
            name = rs["metadata"]["name"]
            if rs["metadata"].get("deletionTimestamp"):
                continue
            if self._owner_gone(rs):  # the garbage collector's part
                self.api.delete("RayService", self.namespace, name)
                continue
            seen.add(name)
            self.reconcile(rs)
        for name in list(self.services):
            if name not in seen:
                self._teardown(name)

    def _owner_gone(self, obj: dict) -> bool:
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "ModelDeployment":
                owner = self.api.get("ModelDeployment", self.namespace, ref["name"])
                if owner is None or owner["metadata"].get("uid") != ref.get("uid"):
                    return True
        return False

    def reconcile(self, rs: dict) -> None:
        name, uid = rs["metadata"]["name"], rs["metadata"].get("uid", "")
        state = self.services.get(name)
        if state is not None and state.uid != uid:  # deleted and re-created between two polls
            self._teardown(name)
            state = None
        if state is None:
            state = self.services[name] = ServiceState(uid=uid)
        spec = rs.get("spec") or {}
        desired = spec.get("rayClusterConfig") or {}
        if state.pending is not None and state.pending.spec != desired:
            self._stop_cluster(state.pending)
            state.pending = None
        if state.pending is None and (state.active is None or state.active.spec != desired):
            state.pending = self._start_cluster(rs, desired)
            state.history.append(state.pending)
        target = state.pending or state.active  # KubeRay deploys on the pending cluster while there is one
        config = spec.get("serveConfigV2") or ""
        if target.deployed != config or not target.apps:
            dashboard_call(target.local, "PUT", deploy_body(config, target.local.serve_port, target.local.head_env.local_path))
            target.deployed = config
            self.deploys.append((name, target.name))
            log.warning("RayService %s: serveConfigV2 deployed on %s", name, target.name)
        wanted = [a["name"] for a in (yaml.safe_load(config) or {}).get("applications") or []]
        for c in (state.pending, state.active):
            if c is not None:
                c.apps = application_statuses(dashboard_call(c.local, "GET"))
        if state.pending is not None and all_running(state.pending.apps, wanted):  # promote
            old, state.active, state.pending = state.active, state.pending, None
            log.warning("RayService %s: %s is active, its applications run", name, state.active.name)
            if old is not None:
                self._stop_cluster(old)
        endpoints = 1 if state.active is not None and proxy_healthy(state.active.local.serve_port) else 0
        current = rs.get("status") or {}
        new = service_status(current, generation=rs["metadata"].get("generation", 1),
                             active=state.active.view() if state.active else None,
                             pending=state.pending.view() if state.pending else None, endpoints=endpoints, now=utcnow())
        if _differs(current, new):
            self.api.patch_status("RayService", self.namespace, name, new)

    def _start_cluster(self, rs: dict, cluster_spec: dict) -> ServeCluster:
        from kuberay_cluster import LocalRayCluster

        rs_name = rs["metadata"]["name"]
        name = f"{rs_name}-raycluster-{secrets.token_hex(3)[:5]}"
        self.api.create({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                         "metadata": {"name": name, "namespace": self.namespace,
                                      "labels": {"ray.io/originated-from-crd": "RayService", "ray.io/originated-from-cr-name": rs_name},
                                      "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayService", "name": rs_name,
                                                           "uid": rs["metadata"].get("uid", ""), "controller": True, "blockOwnerDeletion": True}]},
                         "spec": copy.deepcopy(cluster_spec)})
        t0 = time.monotonic()
        try:
            local = LocalRayCluster.start(cluster_spec, self.namespace, self.api, self.workdir, name=name)
        except Exception:  # e.g. a missing Secret (the pod would not start): retried on the next poll, with a new RayCluster
            self.api.delete("RayCluster", self.namespace, name)
            raise
        log.warning("RayService %s: RayCluster %s up in %.1f s", rs_name, name, time.monotonic() - t0)
        return ServeCluster(name=name, spec=copy.deepcopy(cluster_spec), local=local)

    def _stop_cluster(self, cluster: ServeCluster) -> None:
        try:
            if cluster.local.alive():
                dashboard_call(cluster.local, "DELETE", timeout=60)  # serve.shutdown(): apps and proxies go first
        except (urllib.error.URLError, OSError) as exc:
            log.warning("deleting the Serve apps of %s failed: %s", cluster.name, exc)
        cluster.local.stop()
        self.api.delete("RayCluster", self.namespace, cluster.name)

    def _teardown(self, name: str) -> None:
        state = self.services.pop(name)
        for c in (state.pending, state.active):
            if c is not None:
                self._stop_cluster(c)
        self.stopped[name] = state

    # -- for tests

    def state(self, name: str) -> ServiceState | None:
        with self._lock:
            return self.services.get(name)


def _differs(current: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    strip = lambda st: {k: v for k, v in st.items() if k != "lastUpdateTime" and v is not None}  # noqa: E731
    return strip(dict(current)) != strip(dict(new))
