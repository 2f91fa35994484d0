"""LLM-aware autoscaling: a Ray Serve custom autoscaling policy that follows the engines' own numbers.

`autoscaling.metric` in the serve spec picks the signal: `ongoing_requests` (Ray Serve's default
policy, requests in flight per replica), `queue_depth` (requests waiting in the engines for a batch
row, `num_requests_waiting`) or `kv_cache` (`kv_cache_usage_perc`). Each engine replica reports its
`stats()` through `record_autoscaling_stats` (Ray's custom autoscaling metrics); Ray averages them
over its look-back window and calls `EngineMetricPolicy` with them every control-loop tick.
`desired_replicas` is the pure decision; Ray then applies the scaling factors, the bounds and the
up/down/to-zero delays (`_apply_autoscaling_config`), so this module never sleeps or counts ticks.

The module imports nothing from the platform: Ray pickles the policy by value for its controller.
"""

from __future__ import annotations

# What the engine replicas report (llmplatform.serving.replica.EngineCore.record_autoscaling_stats).
RUNNING, WAITING, KV_CACHE = "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"
POLICY_PATH = "llmplatform.serving.autoscaling:EngineMetricPolicy"


def desired_replicas(metric: str, target: float, current: int, ongoing: float, replicas: list[dict], rows_per_replica: int) -> float:
    """Replicas wanted now (a float; Ray rounds up and bounds it).

    metric: ongoing_requests | queue_depth | kv_cache; target: per-replica value aimed for;
    current: running replicas; ongoing: requests in flight or queued at handles, all replicas;
    replicas: one `stats()` dict per reporting replica; rows_per_replica: requests a replica
    decodes at once (its batch), used to shrink when nothing waits.
    """
    if current == 0:  # Ray's cold-start path scales up on a held request before this is asked
        return 1.0 if ongoing > 0 else 0.0
    if metric == "ongoing_requests":
        desired = ongoing / target
    elif metric == "queue_depth":
        waiting = sum(r.get(WAITING, 0.0) for r in replicas)
        if waiting > target * current:  # more waiting than the replicas are meant to hold
            desired = waiting / target
        elif waiting > 0:
            desired = float(current)  # some queue, within target: hold
        else:  # nothing waits: as many replicas as the running requests fill
            desired = sum(r.get(RUNNING, 0.0) for r in replicas) / max(1, rows_per_replica)
    elif metric == "kv_cache":
        usage = [r.get(KV_CACHE, 0.0) for r in replicas] or [0.0]
        desired = current * (sum(usage) / len(usage)) / target
    else:
        raise ValueError(f"autoscaling.metric {metric!r}: use ongoing_requests, queue_depth or kv_cache")
    busy = ongoing > 0 or any(r.get(RUNNING, 0.0) or r.get(WAITING, 0.0) for r in replicas)
    return max(desired, 1.0) if busy else desired  # never to zero under requests


class EngineMetricPolicy:
    """Ray Serve deployment-level policy (`AutoscalingConfig.policy` with `policy_kwargs`):
    `__call__(ctx)` reads the replicas' reported stats from `ctx.aggregated_metrics`."""

    def __init__(self, metric: str, target: float, rows_per_replica: int):
        self.metric, self.target, self.rows_per_replica = metric, float(target), int(rows_per_replica)

    def __call__(self, ctx) -> tuple[float, dict]:
        metrics = ctx.aggregated_metrics or {}
        ids = ctx.running_replicas or sorted({rid for per in metrics.values() for rid in per}, key=str)
        replicas = [{key: per[rid] for key, per in metrics.items() if rid in per} for rid in ids]
        ongoing = float(ctx.total_num_requests or 0.0)
        if self.metric == "queue_depth" and replicas:  # requests held at handles wait too
            replicas[0] = {**replicas[0], WAITING: replicas[0].get(WAITING, 0.0) + float(ctx.total_queued_requests or 0.0)}
        return desired_replicas(self.metric, self.target, ctx.current_num_replicas, ongoing, replicas, self.rows_per_replica), {}
