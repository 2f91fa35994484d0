"""Ray Serve deployment options for a ServeSpec: placement groups, autoscaling, limits (pure).

A replica reserves a placement group of `tp` bundles, one accelerator plus `cpus_per_shard`
CPUs each. The group is STRICT_PACK (one node) when `tp` fits in a node's accelerators, and
PACK (as few nodes as possible, spilling over) when it doesn't. `tensor_parallel: auto` asks
the planner for the smallest degree that fits the GPU. No I/O: the caller passes what it knows
about the cluster (`gpus_per_node`).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmplatform.errors import ServeError
from llmplatform.specs import ServeSpec


@dataclass(frozen=True)
class ServePlacement:
    """How one engine replica is placed."""

    tensor_parallel: int
    bundles: list[dict[str, float]]  # [] = no placement group (a CPU replica with tp=1)
    strategy: str  # STRICT_PACK | PACK
    accelerator: str | None  # "GPU", a custom resource name, or None on CPU
    replica_resources: dict  # ray_actor_options for the replica actor (fits in bundle 0)


def resolve_tensor_parallel(spec: ServeSpec, model_name: str | None = None) -> int:
    """`tensor_parallel` as a number; `auto` asks the planner (needs `resources.gpu_type`)."""
    if spec.tensor_parallel != "auto":
        return int(spec.tensor_parallel)
    if not spec.resources.gpu_type:
        return 1  # CPU: one shard
    from llmplatform.planner import plan_serving

    name = model_name or spec.model.base
    if not name:
        raise ServeError("tensor_parallel: auto needs model.base (a catalog name) or an explicit number; set tensor_parallel: 1, 2, 4 ...")
    plan = plan_serving(name, spec.resources.gpu_type, dtype=spec.dtype, max_model_len=spec.max_model_len,
                        cpus_per_shard=spec.resources.cpus_per_shard)
    return int(plan.placement.tensor_parallel)


def plan_placement(spec: ServeSpec, engine: str, tp: int, gpus_per_node: int | None = None) -> ServePlacement:
    """Bundles and strategy for one replica. `gpus_per_node`: accelerators on the biggest node (None = unknown)."""
    res = spec.resources
    accel = res.accelerator_resource or ("GPU" if res.gpus_per_shard > 0 else None)
    per_shard = res.gpus_per_shard if res.gpus_per_shard > 0 else 1.0
    if tp == 1 and accel is None:
        return ServePlacement(1, [], "STRICT_PACK", None, {"num_cpus": res.cpus_per_shard})
    bundle: dict[str, float] = {"CPU": res.cpus_per_shard}
    if accel:
        bundle[accel] = per_shard
    bundles = [dict(bundle) for _ in range(tp)]
    strategy = "STRICT_PACK" if gpus_per_node is None or accel is None or tp * per_shard <= gpus_per_node else "PACK"
    if engine == "vllm":
        # vLLM's Ray workers take the accelerators of every bundle, bundle 0 included.
        replica = {"num_cpus": res.cpus_per_shard / 2}
    else:
        replica = {"num_cpus": res.cpus_per_shard}
        if accel == "GPU":
            replica["num_gpus"] = per_shard
        elif accel:
            replica["resources"] = {accel: per_shard}
    return ServePlacement(tp, bundles, strategy, accel, replica)


def autoscaling_config(spec: ServeSpec) -> dict:
    a = spec.autoscaling
    initial = a.initial_replicas if a.initial_replicas is not None else max(1, a.min_replicas)
    return {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": initial,
            "target_ongoing_requests": a.target_ongoing_requests, "downscale_delay_s": a.downscale_delay_s,
            "upscale_delay_s": 5.0}


def engine_options(spec: ServeSpec, placement: ServePlacement) -> dict:
    """`Deployment.options(...)` for the engine deployment."""
    lim = spec.limits
    opts = {
        "name": "engine",
        # The ingress enforces the bound (429 + Retry-After); the engine gets head-room so that
        # streams still winding down never trip Serve's own 503 back-pressure.
        "max_ongoing_requests": 2 * (lim.max_concurrent_requests + lim.max_queued_requests) + 16,
        "ray_actor_options": dict(placement.replica_resources),
        "health_check_period_s": 10.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    a = spec.autoscaling
    if a.min_replicas == a.max_replicas and a.initial_replicas is None:
        opts["num_replicas"] = a.min_replicas
    else:
        opts["autoscaling_config"] = autoscaling_config(spec)
    if placement.bundles:
        opts["placement_group_bundles"] = placement.bundles
        opts["placement_group_strategy"] = placement.strategy
    return opts


def resolve_topology(spec: ServeSpec, engine: str) -> str:
    """`split` or `colocated` (see ServeSpec.topology)."""
    if spec.topology != "auto":
        return spec.topology
    a = spec.autoscaling
    single = a.min_replicas == a.max_replicas == 1 and a.initial_replicas in (None, 1)
    return "colocated" if engine == "vllm" and single else "split"


def colocated_options(spec: ServeSpec, placement: ServePlacement) -> dict:
    """`Deployment.options(...)` for an ingress that holds the engine: the engine's resources,
    placement group and replicas, the ingress's name and request bound."""
    return {**engine_options(spec, placement), "name": "ingress", "max_ongoing_requests": ingress_options(spec)["max_ongoing_requests"]}


def ingress_options(spec: ServeSpec) -> dict:
    """`Deployment.options(...)` for the HTTP ingress: it queues nothing itself; the bound is its own counter."""
    lim = spec.limits
    return {
        "name": "ingress",
        "num_replicas": 1,
        "max_ongoing_requests": lim.max_concurrent_requests + lim.max_queued_requests + 64,
        "ray_actor_options": {"num_cpus": 0.25},
        "graceful_shutdown_timeout_s": 5.0,
    }
