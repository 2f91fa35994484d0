"""Placement groups, strategies and Serve options: resolved once (llmplatform.resolve), put in Serve's shape."""

from __future__ import annotations

import pytest

from llmplatform.resolve import Facts, resolve
from llmplatform.serving.placement import autoscaling_config, colocated_options, engine_options, ingress_options
from llmplatform.specs import parse_spec


def spec(**over):
    body = {"name": "s", "model": {"base": "llama2-7b"}, **over}
    return parse_spec("serve", body)


def plan(engine="hf", gpus_per_node=None, **over):
    return resolve(spec(engine=engine, **over), Facts(vllm_available=engine == "vllm", gpus_per_node=gpus_per_node)).require()


def test_cpu_tp1_needs_no_placement_group():
    p = plan()
    assert p["placement"]["bundles"] == [] and engine_options(p).get("placement_group_bundles") is None


@pytest.mark.parametrize("tp, per_node, strategy", [(2, 8, "STRICT_PACK"), (8, 8, "STRICT_PACK"), (4, 2, "PACK"), (16, 8, "PACK")])
def test_tp_bundles_and_strategy(tp, per_node, strategy):
    p = plan("vllm", per_node, tensor_parallel=tp, resources={"gpus_per_shard": 1, "cpus_per_shard": 2})
    assert p["placement"]["bundles"] == [{"CPU": 2, "GPU": 1}] * tp
    assert p["placement"]["strategy"] == strategy
    opts = engine_options(p)
    assert opts["placement_group_bundles"] == p["placement"]["bundles"] and opts["placement_group_strategy"] == strategy
    assert "num_gpus" not in opts["ray_actor_options"]  # vLLM's workers take the GPUs, bundle 0 included


def test_custom_accelerator_resource_stands_in_for_gpus():
    p = plan("hf", 2, tensor_parallel=2, resources={"accelerator_resource": "fake_gpu", "cpus_per_shard": 1})
    assert p["placement"]["bundles"] == [{"CPU": 1, "fake_gpu": 1}] * 2 and p["placement"]["strategy"] == "STRICT_PACK"
    assert p["placement"]["replica_resources"] == {"num_cpus": 1, "resources": {"fake_gpu": 1}}


def test_tp_auto_asks_the_planner():
    assert plan(tensor_parallel="auto", model={"base": "llama2-70b"}, resources={"gpu_type": "a100-80gb"})["tensor_parallel"] >= 2
    assert plan(tensor_parallel=4)["tensor_parallel"] == 4
    # auto without a known base (registry not looked up) is refused, not silently 1
    refused = resolve(spec(tensor_parallel="auto", model={"registry": "models:/x@prod"}, resources={"gpu_type": "a100-80gb"}))
    assert {p.location for p in refused.problems} == {"model.base", "tensor_parallel"}


def test_autoscaling_and_limits():
    p = plan(autoscaling={"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 8}, limits={"max_concurrent_requests": 16, "max_queued_requests": 4})
    opts = engine_options(p)
    assert opts["autoscaling_config"]["min_replicas"] == 0 and opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["autoscaling_config"]["initial_replicas"] == 1 and opts["autoscaling_config"]["target_ongoing_requests"] == 8
    assert opts["max_ongoing_requests"] >= 20
    fixed = plan(autoscaling={"min_replicas": 2, "max_replicas": 2})
    assert engine_options(fixed)["num_replicas"] == 2
    assert autoscaling_config(fixed)["initial_replicas"] == 2


def test_topology_auto_colocates_only_a_single_vllm_replica():
    assert plan("vllm")["topology"] == "colocated"
    assert plan("hf")["topology"] == "split"
    assert plan("vllm", autoscaling={"min_replicas": 1, "max_replicas": 4})["topology"] == "split"  # routing by adapter matters
    assert plan("vllm", topology="split")["topology"] == "split"
    assert plan("hf", topology="colocated")["topology"] == "colocated"


def test_colocated_ingress_takes_the_engines_placement_group_and_replicas():
    p = plan("vllm", 2, tensor_parallel=2, resources={"accelerator_resource": "fake_gpu"}, autoscaling={"min_replicas": 1, "max_replicas": 3})
    opts = colocated_options(p)
    assert opts["name"] == "ingress" and opts["placement_group_bundles"] == [{"CPU": 1.0, "fake_gpu": 1.0}] * 2
    assert opts["placement_group_strategy"] == "STRICT_PACK" and opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["max_ongoing_requests"] == ingress_options(p.spec)["max_ongoing_requests"]


def test_a_failed_deployment_names_the_exception_its_replicas_raised():
    from types import SimpleNamespace as NS

    from llmplatform.serving.app import failure_reason

    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    import vllm\nModuleNotFoundError: No module named 'vllm'\n"
    app = NS(message="Failed to update the deployments ['ingress'].",
             deployments={"ingress": NS(status="DeploymentStatus.DEPLOY_FAILED", message=trace),
                          "engine": NS(status="DeploymentStatus.HEALTHY", message="")})
    assert failure_reason(app) == "Failed to update the deployments ['ingress']. ingress: ModuleNotFoundError: No module named 'vllm'"
    assert failure_reason(NS(message="", deployments={})) == "no reason reported"
