"""autoscaling.metric: the spec's choice reaches Ray Serve's custom policy API, and the policy scales
on that metric only (synthetic replica stats through Ray's own AutoscalingConfig and context)."""

from __future__ import annotations

import pytest

from llmplatform.errors import PlatformError
from llmplatform.resolve import Facts, resolve
from llmplatform.serving.autoscaling import desired_replicas
from llmplatform.serving.placement import autoscaling_config, engine_options
from llmplatform.specs import parse_spec


def plan(**autoscaling):
    body = {"name": "s", "model": {"base": "llama2-7b"}, "engine": "hf", "limits": {"max_batch_size": 8},
            "autoscaling": {"min_replicas": 1, "max_replicas": 8, **autoscaling}}
    return resolve(parse_spec("serve", body), Facts()).require()


def stats(waiting=0.0, running=0.0, kv=0.0):
    return {"num_requests_waiting": waiting, "num_requests_running": running, "kv_cache_usage_perc": kv}


# A replica decoding a full batch of 8 while its queue grows: in-flight requests stay flat (the
# ingress bounds them at 8 here), the queue does not.
QUEUE_GROWS = [0, 4, 8, 16]


def test_queue_growing_under_flat_ongoing_scales_up_only_with_queue_depth():
    by_queue = [desired_replicas("queue_depth", 2.0, 1, 8.0, [stats(w, 8)], 8) for w in QUEUE_GROWS]
    by_ongoing = [desired_replicas("ongoing_requests", 16.0, 1, 8.0, [stats(w, 8)], 8) for w in QUEUE_GROWS]
    assert by_queue == [1.0, 2.0, 4.0, 8.0]
    assert all(d <= 1 for d in by_ongoing)


def test_queue_depth_holds_within_target_and_shrinks_to_the_running_batches():
    assert desired_replicas("queue_depth", 2.0, 3, 20.0, [stats(1, 8), stats(0, 8), stats(1, 4)], 8) == 3  # 2 waiting <= 2 x 3
    assert desired_replicas("queue_depth", 2.0, 3, 9.0, [stats(0, 5), stats(0, 4), stats(0, 0)], 8) == 9 / 8  # Ray rounds up: 2
    assert desired_replicas("queue_depth", 2.0, 3, 0.0, [stats(), stats(), stats()], 8) == 0  # idle: down to min_replicas


def test_kv_cache_follows_mean_use_and_never_reaches_zero_under_requests():
    assert desired_replicas("kv_cache", 0.5, 2, 4.0, [stats(kv=0.9), stats(kv=0.7)], 8) == pytest.approx(3.2)
    assert desired_replicas("kv_cache", 0.5, 2, 1.0, [stats(running=1, kv=0.01), stats()], 8) == 1.0
    assert desired_replicas("kv_cache", 0.5, 2, 0.0, [stats(), stats()], 8) == 0.0


def test_spec_metric_and_target_resolve_and_reach_serve_options():
    r = plan(metric="queue_depth")["replicas"]
    assert (r["metric"], r["target"], r["rows_per_replica"]) == ("queue_depth", 2.0, 8)
    assert plan(metric="kv_cache")["replicas"]["target"] == 0.7
    assert plan(target=4)["replicas"]["target_ongoing_requests"] == 4  # ongoing_requests: the target is Ray's own
    cfg = engine_options(plan(metric="kv_cache", target=0.5))["autoscaling_config"]
    assert cfg["policy"] == {"policy_function": "llmplatform.serving.autoscaling:EngineMetricPolicy",
                             "policy_kwargs": {"metric": "kv_cache", "target": 0.5, "rows_per_replica": 8}}
    assert "policy" not in autoscaling_config(plan())  # Ray's default policy on ongoing requests


def test_kv_cache_target_above_one_is_refused_naming_the_field():
    with pytest.raises(PlatformError) as e:
        parse_spec("serve", {"name": "s", "model": {"base": "llama2-7b"}, "autoscaling": {"metric": "kv_cache", "target": 70}})
    assert "target (70.0) for metric kv_cache" in str(e.value) and "0 < target <= 1" in str(e.value)
    with pytest.raises(PlatformError) as e:
        parse_spec("serve", {"name": "s", "model": {"base": "llama2-7b"}, "autoscaling": {"metric": "gpu"}})
    assert "autoscaling.metric" in str(e.value)


def ray_policy(p, **over):
    """The policy exactly as Serve's controller runs it: parsed by Ray's AutoscalingConfig (which
    imports and pickles it), instantiated with its kwargs, wrapped with bounds and delays."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(**{**autoscaling_config(p), "upscale_delay_s": 0, **over})
    return config, _apply_autoscaling_config(_resolve_policy_callable(config.policy))


def ray_context(config, replicas: list[dict], ongoing: float, current: int):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name="engine", app_name="s")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(len(replicas))]
    metrics = {key: {rid: r[key] for rid, r in zip(ids, replicas)} for key in stats()}
    return AutoscalingContext(deployment_id=dep, deployment_name="engine", app_name="s", current_num_replicas=current,
                              target_num_replicas=current, running_replicas=ids, total_num_requests=ongoing,
                              total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics={},
                              capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
                              policy_state={}, last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config)


@pytest.mark.parametrize("metric, wanted", [("queue_depth", 8), ("ongoing_requests", 1)])
def test_rays_wrapped_policy_scales_on_the_chosen_metric(metric, wanted):
    p = plan(metric=metric)
    config, policy = ray_policy(p)
    assert config.policy.is_default_policy_function() == (metric == "ongoing_requests")  # Ray's own policy there
    decided, _ = policy(ray_context(config, [stats(waiting=16, running=8, kv=0.4)], ongoing=8.0, current=1))
    assert decided == wanted


def test_rays_wrapped_policy_keeps_scale_to_zero_behind_its_delay():
    config, policy = ray_policy(plan(metric="queue_depth", min_replicas=0, downscale_to_zero_delay_s=60))
    assert config.downscale_to_zero_delay_s == 60
    decided, _ = policy(ray_context(config, [stats()], ongoing=0.0, current=1))
    assert decided == 1  # idle, but not yet for 60 s


def test_downscale_to_zero_delay_resolves_to_the_delay_ray_applies():
    assert plan(min_replicas=0, downscale_delay_s=30)["replicas"]["downscale_to_zero_delay_s"] == 30
    assert plan(min_replicas=0, downscale_delay_s=30, downscale_to_zero_delay_s=900)["replicas"]["downscale_to_zero_delay_s"] == 900
    assert plan(downscale_to_zero_delay_s=900)["replicas"]["downscale_to_zero_delay_s"] is None  # min_replicas 1: never to zero
