"""Ray Serve deployment options from a resolved serve plan (pure).

Every number here was decided by `llmplatform.resolve`: the replica's placement group (`tp`
bundles, STRICT_PACK or PACK), its actor resources, the replica count or autoscaling bounds.
These functions only put them in the shape `Deployment.options(...)` takes.
"""

from __future__ import annotations

from llmplatform.resolve import Resolved
from llmplatform.serving.autoscaling import POLICY_PATH
from llmplatform.specs import ServeSpec


def autoscaling_config(plan: Resolved) -> dict:
    """Serve's `autoscaling_config`: Ray's default policy for `ongoing_requests`, the engine-metric
    policy (llmplatform.serving.autoscaling) for `queue_depth` and `kv_cache`."""
    r = plan["replicas"]
    config = {"min_replicas": r["min"], "max_replicas": r["max"], "initial_replicas": r["initial"],
              "target_ongoing_requests": r["target_ongoing_requests"], "downscale_delay_s": r["downscale_delay_s"],
              "upscale_delay_s": r["upscale_delay_s"]}
    if r.get("downscale_to_zero_delay_s") is not None:
        config["downscale_to_zero_delay_s"] = r["downscale_to_zero_delay_s"]
    if r.get("metric", "ongoing_requests") != "ongoing_requests":
        config["policy"] = {"policy_function": POLICY_PATH,
                            "policy_kwargs": {"metric": r["metric"], "target": r["target"], "rows_per_replica": r["rows_per_replica"]}}
    return config


def engine_options(plan: Resolved) -> dict:
    """`Deployment.options(...)` for the engine deployment."""
    lim, placement = plan.spec.limits, plan["placement"]
    opts = {
        "name": "engine",
        # The ingress enforces the bound (429 + Retry-After); the engine gets head-room so that
        # streams still winding down never trip Serve's own 503 back-pressure.
        "max_ongoing_requests": 2 * (lim.max_concurrent_requests + lim.max_queued_requests) + 16,
        "ray_actor_options": dict(placement["replica_resources"]),
        "health_check_period_s": 10.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if plan["replicas"]["autoscaling"]:
        opts["autoscaling_config"] = autoscaling_config(plan)
    else:
        opts["num_replicas"] = plan["replicas"]["min"]
    if placement["bundles"]:
        opts["placement_group_bundles"] = [dict(b) for b in placement["bundles"]]
        opts["placement_group_strategy"] = placement["strategy"]
    return opts


def colocated_options(plan: Resolved) -> dict:
    """`Deployment.options(...)` for an ingress that holds the engine: the engine's resources,
    placement group and replicas, the ingress's name and request bound."""
    return {**engine_options(plan), "name": "ingress", "max_ongoing_requests": ingress_options(plan.spec)["max_ongoing_requests"]}


def ingress_options(spec: ServeSpec) -> dict:
    """`Deployment.options(...)` for the HTTP ingress: it queues nothing itself; the bound is its own counter."""
    lim = spec.limits
    return {
        "name": "ingress",
        "num_replicas": 1,
        "max_ongoing_requests": lim.max_concurrent_requests + lim.max_queued_requests + 64,
        "ray_actor_options": {"num_cpus": 0.25},
        # A stopping ingress (an update, a scale-down) keeps its in-flight requests until they end or
        # time out. An in-place update replaces the engine at the same time, so those requests wait
        # for the new engine replica; with 5 s the old ingress was killed first and the proxy
        # answered 500 (flow 3 in tests/k8s/test_kuberay_serve.py: 1-2 of ~100 requests).
        "graceful_shutdown_timeout_s": lim.request_timeout_s,
    }
