"""ModelDeployment -> KubeRay RayService (pure).

The RayService has two halves that change for different reasons. `rayClusterConfig` depends only
on what needs different machines (tensor-parallel degree, GPUs, replicas bounds, node pools);
`serveConfigV2` runs `llmplatform.serving.app:build_app` with the resolved plan (`llmplatform.resolve`,
resolved once here) as its args, where registry aliases are pinned to the versions the operator
looked up; the replicas serve exactly those and plan nothing themselves. So an adapter change or an
alias moving in the registry changes only `serveConfigV2`, which KubeRay applies in place on the
running cluster; `update_for` returns exactly that patch and never touches the cluster half.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from llmplatform.resolve import Facts, RegistryFact, Resolved, ResolveError, resolve
from llmplatform.specs import REGISTRY_URI, ServeSpec

from llmoperator.reconcile.common import (
    cr_source, parse_cr_spec,
    HEAD_PORTS, LABEL_DEPLOYMENT, POD_API_KEYS_FILE, RAY_API_VERSION, RAY_VERSION, OperatorConfig, child_metadata,
    pod_template, quantity_gi, tolerations_from,
)

SERVE_IMPORT_PATH = "llmplatform.serving.app:build_app"


def parse_serve(cr: Mapping[str, Any]) -> ServeSpec:
    """The CR's spec as a ServeSpec; raises SpecError naming every bad field."""
    return parse_cr_spec(cr, "ModelDeployment", "serve")  # type: ignore[return-value]


def lookup_refs(spec: ServeSpec) -> list[str]:
    """Registry references the operator looks up before resolving: every alias, and the registry
    reference when the base model must come from its lineage."""
    refs = alias_refs(spec)
    if spec.model.registry and not spec.model.base and spec.model.registry not in refs:
        refs.append(spec.model.registry)
    return refs


def alias_refs(spec: ServeSpec) -> list[str]:
    """Registry references that follow an alias (`models:/NAME@ALIAS`): these need resolving."""
    refs = [spec.model.registry] + [a.source for a in spec.model.adapters]
    out = []
    for ref in refs:
        m = REGISTRY_URI.match(ref or "")
        if m and m.group("alias") and ref not in out:
            out.append(ref)
    return out


def registry_facts(found: Mapping[str, Any]) -> dict[str, RegistryFact]:
    """What the registry lookups returned (a version string, or `registry.lookup`'s dict) as facts."""
    out = {}
    for ref, value in found.items():
        out[ref] = RegistryFact(**value) if isinstance(value, Mapping) else RegistryFact(ref, int(value))
    return out


def plan_for(cr: Mapping[str, Any], cfg: OperatorConfig, found: Mapping[str, Any]) -> Resolved:
    """The ModelDeployment's resolved plan on this cluster, registry references as looked up
    (raises SpecError / ResolveError naming every problem)."""
    spec = parse_serve(cr)
    facts = Facts(target="k8s", vllm_available=cfg.image_has_vllm, registry=registry_facts(found), registry_poll_s=cfg.registry_poll_s,
                  api_keys_file=POD_API_KEYS_FILE)  # cluster_config mounts the API-key Secret there when auth is on
    plan = resolve(spec, facts)
    if plan.problems:
        raise ResolveError(cr_source("ModelDeployment", cr), list(plan.problems))
    return plan


def served_version(plan: Resolved) -> str:
    """What the status shows as served: NAME/VERSION of the registry reference, else of each
    registry adapter (comma-separated), else the base model."""
    def short(pinned_ref: str | None) -> str | None:
        m = REGISTRY_URI.match(pinned_ref or "")
        return f"{m.group('name')}/{m.group('version')}" if m and m.group("version") else None

    if plan["registry"]:
        return short(plan["registry"]["pinned"]) or plan["registry"]["ref"]
    adapters = [v for row in plan["adapters"] if (v := short(row["pinned"]))]
    return ", ".join(adapters) or plan["base_model"] or ""


def serve_config(plan: Resolved) -> str:
    """serveConfigV2 (a YAML string, as KubeRay wants it): build_app with the resolved plan as args."""
    spec = plan.spec
    app = {"name": spec.name, "import_path": SERVE_IMPORT_PATH, "route_prefix": spec.route_prefix, "args": plan.to_dict()}
    return yaml.safe_dump({"applications": [app]}, sort_keys=True)


def cluster_config(plan: Resolved, cfg: OperatorConfig) -> dict:
    """rayClusterConfig: a head without GPUs, one worker group sized for the plan's tp x replicas.
    Every pod gets the Secrets and cache of `cfg` overridden by the spec's `cluster:` section, and
    the API-key Secret at the plan's `api_keys_file` when auth is on (the ingress can land on any pod)."""
    spec: ServeSpec = plan.spec  # type: ignore[assignment]
    cfg = cfg.for_cr(spec.cluster)
    api_keys = plan["api_keys_file"] == POD_API_KEYS_FILE
    tp, pods = plan["tensor_parallel"], plan["pods"]
    res = spec.resources
    pods_per_replica, gpus_per_pod = pods["pods_per_replica"], pods["gpus_per_pod"]
    cpus, memory = pods["cpus_per_pod"], quantity_gi(pods["memory_gb_per_pod"])
    scale = plan["replicas"]
    labels = {LABEL_DEPLOYMENT: spec.name}
    worker = pod_template(
        container_name="ray-worker", cfg=cfg, cpu=str(cpus), memory=memory, gpus=gpus_per_pod,
        node_selector=res.node_selector, tolerations=tolerations_from(res.tolerations), labels=labels, api_keys=api_keys,
    )
    head = pod_template(container_name="ray-head", cfg=cfg, cpu=cfg.head_cpu, memory=cfg.head_memory,
                        ports=HEAD_PORTS + [{"name": "serve", "containerPort": 8000}], labels=labels, api_keys=api_keys)
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": scale["min"] != scale["max"],
        "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"}, "template": head},
        "workerGroupSpecs": [{
            "groupName": f"tp{tp}-{'gpu' if gpus_per_pod else 'cpu'}",
            "replicas": scale["initial"] * pods_per_replica,
            "minReplicas": scale["min"] * pods_per_replica,
            "maxReplicas": scale["max"] * pods_per_replica,
            "numOfHosts": 1,
            "rayStartParams": {},
            "template": worker,
        }],
    }


def rayservice_for(cr: Mapping[str, Any], cfg: OperatorConfig, found: Mapping[str, Any]) -> dict:
    """The RayService object for a ModelDeployment CR, registry references as looked up (raises
    SpecError / ResolveError for a spec that can't run)."""
    plan = plan_for(cr, cfg, found)
    return rayservice_of(plan, cr, cfg)


def rayservice_of(plan: Resolved, cr: Mapping[str, Any], cfg: OperatorConfig) -> dict:
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayService",
        "metadata": child_metadata(cr, LABEL_DEPLOYMENT, cfg),
        "spec": {
            "serveConfigV2": serve_config(plan),
            "rayClusterConfig": cluster_config(plan, cfg),
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
