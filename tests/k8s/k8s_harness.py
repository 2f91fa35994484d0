"""Test harness for the Kubernetes tests: an in-memory API server (kmock), the operator running
against it, and validators for every kind we render (strict kubernetes-validate for built-in
kinds, the KubeRay v1.7.0 CRD schemas for ray.io/v1, our generated CRDs for ours).

KubeRay's CRDs are read from `<repo>/../shared/kuberay-crds/v1.7.0` or `$PLATFORM_KUBERAY_CRDS`;
nothing is copied into the repo. Unknown fields are rejected everywhere: the validators add
`additionalProperties: false` to every object schema that neither preserves unknown fields nor
declares a map, which is what the API server's strict field validation does.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"  # the Kubernetes version we state support for (manifests/README.md)


# ---------------------------------------------------------------------------- schemas


def kuberay_crd_dir() -> Path:
    env = os.environ.get("PLATFORM_KUBERAY_CRDS")
    shared = REPO.parent / "shared" / "kuberay-crds" / "v1.7.0"
    for cand in ([Path(env)] if env else []) + [shared]:
        if (cand / "ray.io_rayjobs.yaml").is_file():
            return cand
    pytest.fail(f"KubeRay v1.7.0 CRD schemas not found: looked in $PLATFORM_KUBERAY_CRDS={env or '(unset)'} and {shared}. "
                "Put ray.io_rayjobs.yaml, ray.io_rayservices.yaml, ray.io_rayclusters.yaml from KubeRay v1.7.0 "
                "(ray-operator/config/crd/bases) in one of them.")


def prometheus_operator_crd_dir() -> Path:
    """PodMonitor/ServiceMonitor CRD schemas (Prometheus Operator 0.93.0): ../shared/prometheus-operator-crds
    or $PLATFORM_PROMETHEUS_OPERATOR_CRDS."""
    env = os.environ.get("PLATFORM_PROMETHEUS_OPERATOR_CRDS")
    shared = REPO.parent / "shared" / "prometheus-operator-crds"
    for cand in ([Path(env)] if env else []) + [shared]:
        if (cand / "monitoring.coreos.com_podmonitors.yaml").is_file():
            return cand
    pytest.fail(f"Prometheus Operator CRD schemas not found: looked in $PLATFORM_PROMETHEUS_OPERATOR_CRDS={env or '(unset)'} and "
                f"{shared}. Put monitoring.coreos.com_podmonitors.yaml and monitoring.coreos.com_servicemonitors.yaml from "
                "prometheus-operator (example/prometheus-operator-crd/) in one of them.")


def close_schema(node: Any) -> Any:
    """Copy of an openAPIV3Schema with unknown fields rejected wherever Kubernetes would prune them."""
    if isinstance(node, list):
        return [close_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: close_schema(v) for k, v in node.items()}
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if (out.get("type") == "object" or "properties" in out) and "properties" in out \
            and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validators(paths: list[Path]) -> dict[tuple[str, str], Callable[[dict], None]]:
    """(apiVersion, kind) -> validate(obj) for each served version of each CRD file."""
    out = {}
    for path in paths:
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB files
        for version in crd["spec"]["versions"]:
            schema = close_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            # metadata is validated by the API server's ObjectMeta, not the CRD: check it loosely.
            schema["properties"]["metadata"] = {"type": "object"}
            validator = jsonschema.Draft4Validator(schema)
            out[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = validator
    return out


class ManifestValidator:
    """validate(obj) raises AssertionError naming the object and every schema violation."""

    def __init__(self) -> None:
        import kubernetes_validate  # noqa: F401  (fail early with a clear import error)

        kuberay = kuberay_crd_dir()
        self.crds = crd_validators(sorted(kuberay.glob("ray.io_*.yaml")) + sorted((REPO / "manifests" / "crds").glob("llmplatform.io_*.yaml"))
                                   + sorted(prometheus_operator_crd_dir().glob("monitoring.coreos.com_*.yaml")))
        self.custom_schemas = crd_validators(sorted((Path(__file__).parent / "schemas").glob("*.yaml")))

    def validate(self, obj: dict) -> str:
        """Validate one object; returns which schema validated it."""
        key = (obj.get("apiVersion"), obj.get("kind"))
        name = f"{key[1]} {obj.get('metadata', {}).get('name')}"
        validator = self.crds.get(key) or self.custom_schemas.get(key)
        if validator is not None:
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            assert not errors, f"{name}: " + "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
            return "crd"
        import kubernetes_validate

        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(f"{name}: no schema for {key} (not a built-in kind, no CRD known): {exc}") from exc
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name}: {exc.message} at {'.'.join(map(str, exc.path))}") from exc
        return "builtin"


RESOURCES = {
    "llmplatform.io/v1alpha1/finetunejobs": ("FineTuneJob", True, {"status"}),
    "llmplatform.io/v1alpha1/modeldeployments": ("ModelDeployment", True, {"status"}),
    "llmplatform.io/v1alpha1/evaluationjobs": ("EvaluationJob", True, {"status"}),
    "ray.io/v1/rayjobs": ("RayJob", True, {"status"}),
    "ray.io/v1/rayservices": ("RayService", True, {"status"}),
    "ray.io/v1/rayclusters": ("RayCluster", True, {"status"}),
    "v1/namespaces": ("Namespace", False, set()),
    "v1/events": ("Event", True, set()),
    "v1/pods": ("Pod", True, {"log"}),
    "v1/secrets": ("Secret", True, set()),  # read by the KubeRay harness (kuberay_pods.py)
    "v1/configmaps": ("ConfigMap", True, set()),
}
VERBS = {"create", "get", "list", "watch", "patch", "update", "delete"}


def stamping_emulator_class() -> type:
    """kmock's emulator plus the API-server behaviour the operator relies on.

    - creates answer 201; writes stamp uid, creationTimestamp and a new resourceVersion (kopf tells its own patches
      from new changes by it); a JSON patch testing a stale resourceVersion gets 422;
    - lists carry the current resourceVersion and their kind (`FineTuneJobList`), and a watch from
      it replays nothing older; a `metadata.name=` field selector narrows lists and watches (so
      `kubectl get` / `kubectl wait` work against it; kmock streams watches as
      application/octet-stream, which client-go can't decode, so kubectl relists about every
      second instead: slower, same answers);
    - deleting an object deletes the objects whose ownerReferences name its uid (the garbage
      collector's background cascade).
    """
    import itertools
    import uuid
    from datetime import datetime, timezone

    import kmock
    from kmock._internal import enums

    counter = itertools.count(100)
    latest = {"rv": 99}

    def next_version() -> str:
        latest["rv"] = next(counter)
        return str(latest["rv"])

    def named_by(request: Any) -> str | None:
        """The name in a `fieldSelector=metadata.name=NAME` (what `kubectl wait` lists and watches with)."""
        selector = request.params.get("fieldSelector") or ""
        return selector.split("=", 1)[1] if selector.startswith("metadata.name=") and "," not in selector else None

    def rv_of(event: Any) -> int:
        try:
            return int(event["object"]["metadata"]["resourceVersion"])
        except (KeyError, TypeError, ValueError):
            return 1 << 62

    class StampingEmulator(kmock.KubernetesEmulator):
        keep_requests: int | None = None  # kmock matches each request against its whole log: cap it for long tests

        async def _handle(self, request: Any) -> Any:
            if self.keep_requests and len(self._requests) > 2 * self.keep_requests:
                del self._requests[: -self.keep_requests]
            if request.resource is not None and request.action in (enums.action.CREATE, enums.action.UPDATE):
                data = request.data
                if isinstance(data, dict):
                    meta = data.setdefault("metadata", {})
                    meta["resourceVersion"] = next_version()
                    if request.action == enums.action.CREATE:
                        meta.setdefault("uid", str(uuid.uuid4()))
                        meta.setdefault("creationTimestamp", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                        meta.setdefault("generation", 1)
                elif isinstance(data, list):  # JSON patch (kopf's finalizer edits)
                    key = (request.resource, request.namespace, request.name)
                    current = self.objects[key].get("metadata", {}).get("resourceVersion") if key in self.objects else None
                    for op in data:
                        if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" and op.get("value") != current:
                            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"resourceVersion {op.get('value')} is stale (now {current})")
                    data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": next_version()})
            key = owner_uid = None
            if request.resource is not None and request.action in (enums.action.DELETE, enums.action.UPDATE) and request.name:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    owner_uid = self.objects[key].get("metadata", {}).get("uid")
            response = await super()._handle(request)
            if request.action == enums.action.CREATE and getattr(response, "status", None) == 200 and not response.prepared:
                response.set_status(201)  # the API server's answer to a create (clients key on it)
            if owner_uid and self.objects[key].deleted:  # gone now (deleted, or its last finalizer removed)
                await self._collect_garbage(owner_uid)
            return response

        async def _collect_garbage(self, owner_uid: str) -> None:
            async with self._lock:
                for (resource, _ns, _name), obj in list(self.objects.items()):
                    owners = obj.get("metadata", {}).get("ownerReferences", []) if not obj.deleted else []
                    if any(o.get("uid") == owner_uid for o in owners):
                        raw = obj.raw
                        obj.delete()
                        await self._buses[resource].put({"type": "DELETED", "object": raw})

        async def _serve_list(self, request: Any) -> Any:
            result = await super()._serve_list(request)
            result["metadata"]["resourceVersion"] = str(latest["rv"])
            res = request.resource
            group_version = f"{res.group}/{res.version}" if res.group else res.version
            if f"{group_version}/{res.plural}" in RESOURCES:  # client-go (kubectl) decodes a list by its kind
                result["apiVersion"], result["kind"] = group_version, f"{RESOURCES[f'{group_version}/{res.plural}'][0]}List"
            name = named_by(request)
            if name is not None:
                result["items"] = [o for o in result["items"] if o.get("metadata", {}).get("name") == name]
            return result

        async def _serve_watch(self, request: Any) -> Any:
            since = int(request.params.get("resourceVersion") or 0)
            name = named_by(request)
            async for event in super()._serve_watch(request):
                if isinstance(event, dict) and rv_of(event) <= since:
                    continue
                if name is not None and isinstance(event, dict) and (event.get("object") or {}).get("metadata", {}).get("name") != name:
                    continue
                yield event

    return StampingEmulator


class InMemoryCluster:
    """A kmock KubernetesEmulator on a free 127.0.0.1 port, served from a background event loop."""

    def __init__(self, keep_requests: int | None = None) -> None:
        """`keep_requests`: how many recent requests `requests_to` can see (None: all). kmock checks
        every request against its whole log, so tests that poll for minutes set a cap."""
        self.keep_requests = keep_requests
        self.url = ""
        self.emulator: Any = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        import kmock

        self._stop = asyncio.Event()
        async with stamping_emulator_class()() as emulator, kmock.Server(emulator) as server:
            emulator.keep_requests = self.keep_requests
            for key, (kind, namespaced, subresources) in RESOURCES.items():
                emulator.resources[key] = kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced, subresources=subresources, verbs=VERBS)
            self.emulator, self.url = emulator, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> "InMemoryCluster":
        self._thread.start()
        assert self._ready.wait(15), "kmock server did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
        self._thread.join(10)

    def requests_to(self, method: str, path_part: str) -> list[Any]:
        return [r for r in list(self.emulator) if r.method is not None and r.method.value == method.upper() and path_part in str(r.url)]


class OperatorThread:
    """The real kopf operator (our registry) in a thread, logged in to the in-memory API."""

    def __init__(self, url: str, deps: Any) -> None:
        self.url, self.deps = url, deps
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kopf", daemon=True)

    def _run(self) -> None:
        import kopf

        from llmoperator.handlers import configure, make_registry

        registry = make_registry(self.deps)

        @kopf.on.login(registry=registry)
        def _login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=self.url, insecure=True, default_namespace="default")

        settings = kopf.OperatorSettings()
        configure(settings)
        settings.watching.server_timeout = 10
        settings.networking.request_timeout = 10
        settings.posting.enabled = False
        try:
            asyncio.run(kopf.operator(registry=registry, settings=settings, clusterwide=True, standalone=True,
                                      stop_flag=self.stop_flag, ready_flag=self.ready_flag))
        except BaseException as exc:  # surfaced by the fixture
            self.error = exc

    def __enter__(self) -> "OperatorThread":
        self._thread.start()
        assert self.ready_flag.wait(20), f"operator did not become ready: {self.error!r}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_flag.set()
        self._thread.join(20)


def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class FakeRegistry:
    """Stands in for MLflow's alias lookup: tests move aliases by assignment."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.calls = 0

    def __call__(self, ref: str, tracking_uri: str | None) -> str:
        from llmplatform.errors import RegistryError

        self.calls += 1
        if ref not in self.aliases:
            raise RegistryError(f"alias {ref} not found")
        return self.aliases[ref]


