"""ModelDeployment -> KubeRay RayService (pure).

The RayService has two halves that change for different reasons. `rayClusterConfig` depends only
on what needs different machines (tensor-parallel degree, GPUs, replicas bounds, node pools);
`serveConfigV2` runs `llmplatform.serving.app:build_app` with the ServeSpec as its args, where
registry aliases are pinned to the versions the operator resolved. So an adapter change or an
alias moving in the registry changes only `serveConfigV2`, which KubeRay applies in place on the
running cluster; `update_for` returns exactly that patch and never touches the cluster half.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import yaml

from llmplatform.specs import REGISTRY_URI, ServeSpec, parse_spec

from llmoperator.reconcile.common import (
    HEAD_PORTS, LABEL_DEPLOYMENT, RAY_API_VERSION, RAY_VERSION, OperatorConfig, child_metadata,
    pod_template, quantity_gi, tolerations_from,
)

SERVE_IMPORT_PATH = "llmplatform.serving.app:build_app"
GPUS_PER_NODE = 8  # default GPUs in one node: a TP group larger than this spans pods (PACK)


def parse_serve(cr: Mapping[str, Any]) -> ServeSpec:
    """The CR's spec as a ServeSpec; raises SpecError naming every bad field."""
    body = dict(cr.get("spec") or {})
    body.setdefault("name", cr["metadata"]["name"])
    source = f"ModelDeployment {cr['metadata'].get('namespace', '')}/{cr['metadata']['name']}"
    return parse_spec("serve", body, source)  # type: ignore[return-value]


def alias_refs(spec: ServeSpec) -> list[str]:
    """Registry references that follow an alias (`models:/NAME@ALIAS`): these need resolving."""
    refs = [spec.model.registry] + [a.source for a in spec.model.adapters]
    out = []
    for ref in refs:
        m = REGISTRY_URI.match(ref or "")
        if m and m.group("alias") and ref not in out:
            out.append(ref)
    return out


def pin(ref: str | None, resolved: Mapping[str, str]) -> str | None:
    """`models:/NAME@ALIAS` -> `models:/NAME/VERSION` when resolved; anything else unchanged."""
    if ref in resolved:
        m = REGISTRY_URI.match(ref)  # type: ignore[arg-type]
        return f"models:/{m.group('name')}/{resolved[ref]}"  # type: ignore[union-attr]
    return ref


def serve_args(spec: ServeSpec, resolved: Mapping[str, str]) -> dict:
    """build_app's args: the ServeSpec as a dict, aliases pinned to resolved versions."""
    args = spec.model_dump(mode="json")
    args["model"]["registry"] = pin(spec.model.registry, resolved)
    for adapter in args["model"]["adapters"]:
        adapter["source"] = pin(adapter["source"], resolved)
    return args


def _ref_version(ref: str, resolved: Mapping[str, str]) -> str | None:
    m = REGISTRY_URI.match(ref or "")
    if not m:
        return None
    version = resolved.get(ref) or m.group("version")
    return f"{m.group('name')}/{version}" if version else None


def served_version(spec: ServeSpec, resolved: Mapping[str, str]) -> str:
    """What the status shows as served: NAME/VERSION of the registry reference, else of each
    registry adapter (comma-separated), else the base model."""
    if spec.model.registry:
        return _ref_version(spec.model.registry, resolved) or spec.model.registry
    adapters = [v for a in spec.model.adapters if (v := _ref_version(a.source, resolved))]
    return ", ".join(adapters) or spec.model.base or ""


def serve_config(spec: ServeSpec, resolved: Mapping[str, str]) -> str:
    """serveConfigV2 (a YAML string, as KubeRay wants it)."""
    app = {"name": spec.name, "import_path": SERVE_IMPORT_PATH, "route_prefix": spec.route_prefix, "args": serve_args(spec, resolved)}
    return yaml.safe_dump({"applications": [app]}, sort_keys=True)


def tensor_parallel(spec: ServeSpec) -> int:
    """The TP degree: the spec's, or for `auto` the planner's for the GPU type (1 without one)."""
    if isinstance(spec.tensor_parallel, int):
        return spec.tensor_parallel
    if not (spec.resources.gpu_type and spec.model.base):
        return 1
    from llmplatform.errors import PlatformError, Problem, SpecError
    from llmplatform.planner import plan_serving

    try:
        plan = plan_serving(spec.model.base, spec.resources.gpu_type, dtype=spec.dtype, max_model_len=spec.max_model_len)
    except (PlatformError, KeyError, ValueError) as exc:
        raise SpecError("tensor_parallel", [Problem("tensor_parallel", f"cannot plan 'auto': {exc}", "auto", "a power of two, or a catalog base model and a known gpu_type")]) from exc
    return plan.tensor_parallel


def _gpus_per_node(spec: ServeSpec) -> int:
    if not spec.resources.gpu_type:
        return GPUS_PER_NODE
    from llmplatform.gpus import get_gpu

    try:
        return get_gpu(spec.resources.gpu_type).gpus_per_node
    except Exception:  # unknown GPU names were already reported by the planner or are custom
        return GPUS_PER_NODE


def cluster_config(spec: ServeSpec, cfg: OperatorConfig) -> dict:
    """rayClusterConfig: a head without GPUs, one worker group sized for tp x replicas."""
    tp = tensor_parallel(spec)
    res = spec.resources
    per_shard = res.gpus_per_shard or (1.0 if res.gpu_type else 0.0)
    gpus_per_replica = math.ceil(tp * per_shard)
    if gpus_per_replica:
        pods_per_replica = math.ceil(gpus_per_replica / _gpus_per_node(spec))
        gpus_per_pod = math.ceil(gpus_per_replica / pods_per_replica)
    else:
        pods_per_replica, gpus_per_pod = 1, 0
    shards_per_pod = math.ceil(tp / pods_per_replica)
    cpus = math.ceil(shards_per_pod * res.cpus_per_shard) + 1
    memory = quantity_gi(24.0 * gpus_per_pod if gpus_per_pod else 8.0)
    scale = spec.autoscaling
    initial = scale.initial_replicas if scale.initial_replicas is not None else max(1, scale.min_replicas)
    labels = {LABEL_DEPLOYMENT: spec.name}
    worker = pod_template(
        container_name="ray-worker", cfg=cfg, cpu=str(cpus), memory=memory, gpus=gpus_per_pod,
        node_selector=res.node_selector, tolerations=tolerations_from(res.tolerations), labels=labels,
    )
    head = pod_template(container_name="ray-head", cfg=cfg, cpu=cfg.head_cpu, memory=cfg.head_memory,
                        ports=HEAD_PORTS + [{"name": "serve", "containerPort": 8000}], labels=labels)
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": scale.min_replicas != scale.max_replicas,
        "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"}, "template": head},
        "workerGroupSpecs": [{
            "groupName": f"tp{tp}-{'gpu' if gpus_per_pod else 'cpu'}",
            "replicas": initial * pods_per_replica,
            "minReplicas": scale.min_replicas * pods_per_replica,
            "maxReplicas": scale.max_replicas * pods_per_replica,
            "numOfHosts": 1,
            "rayStartParams": {},
            "template": worker,
        }],
    }


def rayservice_for(cr: Mapping[str, Any], cfg: OperatorConfig, resolved: Mapping[str, str]) -> dict:
    """The RayService object for a ModelDeployment CR (raises SpecError for an invalid spec)."""
    spec = parse_serve(cr)
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayService",
        "metadata": child_metadata(cr, LABEL_DEPLOYMENT, cfg),
        "spec": {
            "serveConfigV2": serve_config(spec, resolved),
            "rayClusterConfig": cluster_config(spec, cfg),
        },
    }


def update_for(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> tuple[str, dict]:
    """How to move the live RayService to `desired`: ("none"|"serve-config"|"cluster", merge patch).

    Serve-config-only differences give a patch with `serveConfigV2` alone, so KubeRay updates the
    applications in place on the running cluster; only a cluster difference sends the cluster half.
    """
    old, new = existing.get("spec") or {}, desired["spec"]
    if old.get("rayClusterConfig") != new["rayClusterConfig"]:
        return "cluster", {"spec": {"rayClusterConfig": new["rayClusterConfig"], "serveConfigV2": new["serveConfigV2"]}}
    if old.get("serveConfigV2") != new["serveConfigV2"]:
        return "serve-config", {"spec": {"serveConfigV2": new["serveConfigV2"]}}
    return "none", {}
