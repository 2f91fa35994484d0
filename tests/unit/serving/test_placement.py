"""Placement groups, strategies and Serve options derived from a ServeSpec (pure)."""

from __future__ import annotations

import pytest

from llmplatform.serving.placement import autoscaling_config, engine_options, plan_placement, resolve_tensor_parallel
from llmplatform.specs import parse_spec


def spec(**over):
    body = {"name": "s", "model": {"base": "llama2-7b"}, **over}
    return parse_spec("serve", body)


def test_cpu_tp1_needs_no_placement_group():
    p = plan_placement(spec(), "hf", 1)
    assert p.bundles == [] and engine_options(spec(), p).get("placement_group_bundles") is None


@pytest.mark.parametrize("tp, per_node, strategy", [(2, 8, "STRICT_PACK"), (8, 8, "STRICT_PACK"), (4, 2, "PACK"), (16, 8, "PACK")])
def test_tp_bundles_and_strategy(tp, per_node, strategy):
    s = spec(resources={"gpus_per_shard": 1, "cpus_per_shard": 2})
    p = plan_placement(s, "vllm", tp, per_node)
    assert p.bundles == [{"CPU": 2, "GPU": 1}] * tp
    assert p.strategy == strategy
    opts = engine_options(s, p)
    assert opts["placement_group_bundles"] == p.bundles and opts["placement_group_strategy"] == strategy
    assert "num_gpus" not in opts["ray_actor_options"]  # vLLM's workers take the GPUs, bundle 0 included


def test_custom_accelerator_resource_stands_in_for_gpus():
    s = spec(resources={"accelerator_resource": "fake_gpu", "cpus_per_shard": 1})
    p = plan_placement(s, "hf", 2, 2)
    assert p.bundles == [{"CPU": 1, "fake_gpu": 1}] * 2 and p.strategy == "STRICT_PACK"
    assert p.replica_resources == {"num_cpus": 1, "resources": {"fake_gpu": 1}}


def test_tp_auto_asks_the_planner():
    assert resolve_tensor_parallel(spec(tensor_parallel="auto", model={"base": "llama2-70b"}, resources={"gpu_type": "a100-80gb"})) >= 2
    assert resolve_tensor_parallel(spec(tensor_parallel="auto", resources={"gpu_type": "a100-80gb"})) == 1
    assert resolve_tensor_parallel(spec(tensor_parallel=4)) == 4


def test_autoscaling_and_limits():
    s = spec(autoscaling={"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 8}, limits={"max_concurrent_requests": 16, "max_queued_requests": 4})
    opts = engine_options(s, plan_placement(s, "hf", 1))
    assert opts["autoscaling_config"]["min_replicas"] == 0 and opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["autoscaling_config"]["initial_replicas"] == 1 and opts["autoscaling_config"]["target_ongoing_requests"] == 8
    assert opts["max_ongoing_requests"] >= 20
    fixed = spec(autoscaling={"min_replicas": 2, "max_replicas": 2})
    assert engine_options(fixed, plan_placement(fixed, "hf", 1))["num_replicas"] == 2
    assert autoscaling_config(fixed)["initial_replicas"] == 2


def test_topology_auto_colocates_only_a_single_vllm_replica():
    from llmplatform.serving.placement import resolve_topology

    assert resolve_topology(spec(), "vllm") == "colocated"
    assert resolve_topology(spec(), "hf") == "split"
    assert resolve_topology(spec(autoscaling={"min_replicas": 1, "max_replicas": 4}), "vllm") == "split"  # routing by adapter matters
    assert resolve_topology(spec(topology="split"), "vllm") == "split"
    assert resolve_topology(spec(topology="colocated"), "hf") == "colocated"


def test_colocated_ingress_takes_the_engines_placement_group_and_replicas():
    from llmplatform.serving.placement import colocated_options, ingress_options

    s = spec(tensor_parallel=2, resources={"accelerator_resource": "fake_gpu"}, autoscaling={"min_replicas": 1, "max_replicas": 3})
    opts = colocated_options(s, plan_placement(s, "vllm", 2, 2))
    assert opts["name"] == "ingress" and opts["placement_group_bundles"] == [{"CPU": 1.0, "fake_gpu": 1.0}] * 2
    assert opts["placement_group_strategy"] == "STRICT_PACK" and opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["max_ongoing_requests"] == ingress_options(s)["max_ongoing_requests"]


def test_a_failed_deployment_names_the_exception_its_replicas_raised():
    from types import SimpleNamespace as NS

    from llmplatform.serving.app import failure_reason

    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    import vllm\nModuleNotFoundError: No module named 'vllm'\n"
    app = NS(message="Failed to update the deployments ['ingress'].",
             deployments={"ingress": NS(status="DeploymentStatus.DEPLOY_FAILED", message=trace),
                          "engine": NS(status="DeploymentStatus.HEALTHY", message="")})
    assert failure_reason(app) == "Failed to update the deployments ['ingress']. ingress: ModuleNotFoundError: No module named 'vllm'"
    assert failure_reason(NS(message="", deployments={})) == "no reason reported"
