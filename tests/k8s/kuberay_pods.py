"""What a kubelet gives a KubeRay pod's container, played on this machine: its env and its volumes.

`container_env(container, pod_spec, namespace, api, mounts_root)` resolves a container of a pod
template the way the kubelet would before starting it:

- `env` in order (later entries may use `$(NAME)` of earlier ones), `valueFrom.secretKeyRef` /
  `configMapKeyRef` read from the kmock API, `envFrom` (secretRef / configMapRef, with `prefix`);
  a missing Secret/ConfigMap or key that is not `optional` raises `ContainerConfigError` naming it,
  as the kubelet refuses such a pod (CreateContainerConfigError);
- every `volumeMount` becomes a local directory: a PVC is `<mounts_root>/pvc/<namespace>/<claim>`,
  shared by every pod and every cluster that uses this `mounts_root` (so it outlives a cluster);
  `emptyDir` is a directory of this pod; Secret / ConfigMap volumes are materialised as files
  (`items` honoured) from the kmock objects;
- env values that are a path under a mountPath are rewritten to the local directory, and paths
  under the container's home (`/home/ray`, e.g. PLATFORM_HOME) to a home directory of this pod.

`PodEnv.process_env()` is what a process of the pod is started with: the "image" env (PATH,
PYTHONPATH, offline switches and the model cache the image would bake in, taken from this
process, with this venv's `python` first on PATH) plus the container's env, and nothing else of the test process.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

CONTAINER_HOME = "/home/ray"  # the rayproject/ray image's (and our image's) home
# What the platform image provides before the pod spec adds anything (taken from this process).
IMAGE_ENV_KEYS = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PLATFORM_MODEL_CACHE",
                  "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TMPDIR")
_pod_counter = itertools.count(1)


class ContainerConfigError(RuntimeError):
    """The kubelet would not start this container (CreateContainerConfigError): a Secret/ConfigMap or key is missing."""


@dataclass
class PodEnv:
    """A container's resolved env and its mounts (mountPath -> local directory)."""

    env: dict[str, str]
    mounts: dict[str, Path] = field(default_factory=dict)
    home: Path | None = None  # the pod's stand-in for CONTAINER_HOME

    def local_path(self, container_path: str) -> Path:
        """The local directory/file that `container_path` is in this pod (longest mountPath wins)."""
        mapped = map_path(container_path, self._prefixes())
        if mapped is None:
            raise KeyError(f"{container_path} is neither under a volumeMount ({sorted(self.mounts)}) nor under {CONTAINER_HOME}")
        return Path(mapped)

    def _prefixes(self) -> dict[str, Path]:
        return {**({CONTAINER_HOME: self.home} if self.home else {}), **self.mounts}

    def process_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Image env + container env (+ `extra`, the harness's Ray plumbing): a process of this pod."""
        base = {k: os.environ[k] for k in IMAGE_ENV_KEYS if k in os.environ}
        # the image's `python` (what entrypoints call) is this venv's
        base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "/usr/bin:/bin")])
        if self.home:
            base["HOME"] = str(self.home)
        return {**base, **self.env, **(extra or {})}


def map_path(value: str, prefixes: Mapping[str, Path]) -> str | None:
    """`value` with its longest matching container-path prefix replaced by the local dir, or None."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        p = prefix.rstrip("/")
        if value == p or value.startswith(p + "/"):
            return str(prefixes[prefix]) + value[len(p):]
    return None


# ---------------------------------------------------------------------------- Secrets and ConfigMaps


def _core(api: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api._client)  # KubeApi exposes custom objects only; the harness reads core kinds


def read_data(api: Any, kind: str, namespace: str, name: str) -> dict[str, str] | None:
    """The decoded data of a Secret or ConfigMap in kmock (None when it does not exist)."""
    from kubernetes.client.exceptions import ApiException

    core = _core(api)
    read = core.read_namespaced_secret if kind == "Secret" else core.read_namespaced_config_map
    try:
        obj = api._client.sanitize_for_serialization(read(name, namespace))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} if kind == "Secret" \
        else dict(obj.get("data") or {})
    data.update(obj.get("stringData") or {})  # kmock keeps stringData as written; the API server would merge it
    return data


def _ref_value(api: Any, kind: str, namespace: str, ref: Mapping[str, Any], var: str, container: str) -> str | None:
    data = read_data(api, kind, namespace, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        missing = f"{kind} {namespace}/{ref['name']}" + ("" if data is None else f" has no key {ref['key']!r}")
        raise ContainerConfigError(f"container {container}: env {var}: {missing} (CreateContainerConfigError)")
    return data[ref["key"]]


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(value: str, env: Mapping[str, str]) -> str:
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def resolve_env(container: Mapping[str, Any], namespace: str, api: Any) -> dict[str, str]:
    """The container's env as the kubelet computes it: envFrom first, then env (which wins)."""
    name = container.get("name", "?")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = ("Secret", source["secretRef"]) if "secretRef" in source else ("ConfigMap", source["configMapRef"])
        data = read_data(api, kind, namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ContainerConfigError(f"container {name}: envFrom {kind} {namespace}/{ref['name']} not found (CreateContainerConfigError)")
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
        elif "valueFrom" in item:
            src = item["valueFrom"]
            if "secretKeyRef" in src:
                value = _ref_value(api, "Secret", namespace, src["secretKeyRef"], item["name"], name)
            elif "configMapKeyRef" in src:
                value = _ref_value(api, "ConfigMap", namespace, src["configMapKeyRef"], item["name"], name)
            else:
                raise NotImplementedError(f"container {name}: env {item['name']}: valueFrom {sorted(src)} is not played by the harness")
            if value is not None:
                env[item["name"]] = value
        else:
            env[item["name"]] = ""
    return env


# ---------------------------------------------------------------------------- volumes


def _materialise(api: Any, kind: str, namespace: str, source: Mapping[str, Any], target: Path, container: str) -> None:
    name = source.get("secretName") if kind == "Secret" else source.get("name")
    data = read_data(api, kind, namespace, name)
    if data is None:
        if source.get("optional"):
            data = {}
        else:
            raise ContainerConfigError(f"container {container}: volume {kind} {namespace}/{name} not found (the pod stays in ContainerCreating)")
    items = source.get("items") or [{"key": k, "path": k} for k in data]
    target.mkdir(parents=True, exist_ok=True)
    for item in items:
        if item["key"] not in data:
            if source.get("optional"):
                continue
            raise ContainerConfigError(f"container {container}: volume {kind} {namespace}/{name} has no key {item['key']!r}")
        path = target / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data[item["key"]])
        path.chmod(0o600 if kind == "Secret" else 0o644)


def volume_dir(volume: Mapping[str, Any], pod_dir: Path, mounts_root: Path, namespace: str, api: Any, container: str) -> Path:
    """The local directory standing in for one pod volume (created, and filled for Secret/ConfigMap)."""
    name = volume["name"]
    if "persistentVolumeClaim" in volume:
        path = mounts_root / "pvc" / namespace / volume["persistentVolumeClaim"]["claimName"]
    elif "emptyDir" in volume:
        path = pod_dir / "volumes" / name
    elif "secret" in volume:
        path = pod_dir / "volumes" / name
        _materialise(api, "Secret", namespace, volume["secret"], path, container)
    elif "configMap" in volume:
        path = pod_dir / "volumes" / name
        _materialise(api, "ConfigMap", namespace, volume["configMap"], path, container)
    else:
        raise NotImplementedError(f"volume {name}: {sorted(set(volume) - {'name'})} is not played by the harness")
    path.mkdir(parents=True, exist_ok=True)
    return path


def container_env(container: dict, pod_spec: dict, namespace: str, api: Any, mounts_root: Path, pod_name: str | None = None) -> PodEnv:
    """The env and mounts of `container` in a pod from `pod_spec` (see the module docstring).

    Each call is a new pod: it gets its own directory `<mounts_root>/pods/<pod_name or container-N>`
    (home, emptyDirs, Secret/ConfigMap files); PVC directories are shared under `<mounts_root>/pvc`.
    Raises ContainerConfigError for a missing non-optional Secret/ConfigMap/key."""
    mounts_root = Path(mounts_root)
    cname = container.get("name", "container")
    pod_dir = mounts_root / "pods" / (pod_name or f"{cname}-{next(_pod_counter)}")
    home = pod_dir / "home"
    home.mkdir(parents=True, exist_ok=True)
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes:
            raise ContainerConfigError(f"container {cname}: volumeMount {mount['name']} names no volume of the pod")
        local = volume_dir(volumes[mount["name"]], pod_dir, mounts_root, namespace, api, cname)
        if mount.get("subPath"):
            local = local / mount["subPath"]
            local.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = local
    env = resolve_env(container, namespace, api)
    prefixes = {CONTAINER_HOME: home, **mounts}
    env = {k: (map_path(v, prefixes) or v) if v.startswith("/") else v for k, v in env.items()}
    return PodEnv(env=env, mounts=mounts, home=home)
