"""The operator's pods, the ScalingConfig the job builds and the Serve placement group agree,
because all three read one resolved plan (llmplatform.resolve), for every shipped spec and a
matrix of Llama 2 sizes x methods x GPU types."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import yaml

from llmplatform.backends.k8s import finetune_job_cr, model_deployment_cr
from llmplatform.planner import plan_serving, plan_training
from llmplatform.resolve import Resolved, ResolveError
from llmplatform.specs import load_spec, parse_spec

from llmoperator.reconcile import deployment, finetune
from llmoperator.reconcile.common import OperatorConfig

REPO = Path(__file__).resolve().parents[2]
CFG = OperatorConfig(image="registry.example/llm-platform:test", image_has_vllm=True)
MODELS, METHODS, GPUS = ("llama2-7b", "llama2-13b", "llama2-70b"), ("lora", "qlora"), ("a10g-24gb", "l4-24gb", "a100-40gb", "a100-80gb", "h100-80gb")
# fine-tune and serve specs: the kinds the operator runs (an eval spec runs from platformctl only)
SPECS = sorted(p for p in (REPO / "jobs").rglob("*.yaml")
               if p.name != "kustomization.yaml" and load_spec(p).__class__.__name__ != "EvaluationSpec")


def with_uid(cr: dict) -> dict:
    cr["metadata"]["uid"] = "0000-1111"
    return cr


def job_side(rayjob: dict) -> tuple[Resolved, object]:
    """The plan the RayJob's entrypoint receives, and the ScalingConfig the job builds from it."""
    from llmplatform.training.trainer import scaling_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    plan = Resolved.from_dict(json.loads(argv[argv.index("--resolved-json") + 1]))
    return plan, scaling_config(plan)


def pod_gpus(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def assert_sweep_agrees(rayjob: dict) -> list[Resolved]:
    """A sweep's RayJob: every trial's plan (what its Ray Train run gets) fits the worker pods, and the
    worker group holds `max_concurrent` of the largest trials at once."""
    from llmplatform.training.trainer import scaling_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "llmplatform.training.sweep"]
    doc = json.loads(argv[argv.index("--sweep-json") + 1])
    trials = [Resolved.from_dict(p) for p in doc["plans"]]
    [group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = limits["cpu"]
    pod_cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    for trial in trials:
        scaling = scaling_config(trial)
        assert scaling.resources_per_worker["CPU"] * trial["pods"]["workers_per_pod"] <= pod_cpus, "a trial's workers fit a pod"
        assert scaling.num_workers * (scaling.resources_per_worker or {}).get("GPU", 0) <= pod_gpus(group) * trial["pods"]["pods"]
    concurrent = min(doc["sweep"]["max_concurrent"], len(trials))
    largest = sorted((t["pods"]["pods"] for t in trials), reverse=True)[:concurrent]
    assert group["replicas"] == sum(largest), "the worker group holds max_concurrent of the largest trials"
    return trials


def assert_job_agrees(rayjob: dict) -> Resolved:
    plan, scaling = job_side(rayjob)
    if plan.spec.sweep is not None:
        assert_sweep_agrees(rayjob)
        return plan
    [group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus_in_pods = pod_gpus(group) * group["replicas"]
    assert scaling.use_gpu == (gpus_in_pods > 0), "use_gpu is true exactly when pods request GPUs"
    assert scaling.num_workers == plan["workers"] and scaling.num_workers <= group["replicas"] * plan["pods"]["workers_per_pod"]
    gpus_wanted = scaling.num_workers * (scaling.resources_per_worker or {}).get("GPU", 0)
    assert gpus_wanted <= gpus_in_pods, f"workers want {gpus_wanted} GPUs, pods hold {gpus_in_pods}"
    cpu = group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    pod_cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert scaling.resources_per_worker["CPU"] * plan["pods"]["workers_per_pod"] <= pod_cpus, "the workers' CPUs fit their pod"
    return plan


def app_side(rayservice: dict) -> tuple[Resolved, dict]:
    """The plan in serveConfigV2 and the engine options build_app makes from it (placement group, replicas)."""
    from llmplatform.serving.placement import colocated_options, engine_options

    [app] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    plan = Resolved.from_dict(app["args"])
    return plan, (colocated_options(plan) if plan["topology"] == "colocated" else engine_options(plan))


def assert_service_agrees(rayservice: dict) -> Resolved:
    plan, opts = app_side(rayservice)
    [group] = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    bundles = opts.get("placement_group_bundles", [])
    group_gpus = sum(b.get("GPU", 0) for b in bundles)
    replicas = opts.get("num_replicas") or opts["autoscaling_config"]["initial_replicas"]
    assert len(bundles) in (0, plan["tensor_parallel"])
    assert group_gpus * replicas <= pod_gpus(group) * group["replicas"], "TP x replicas GPUs fit the worker group"
    max_replicas = opts.get("num_replicas") or opts["autoscaling_config"]["max_replicas"]
    assert group_gpus * max_replicas <= pod_gpus(group) * group["maxReplicas"]
    if group_gpus:
        assert math.ceil(group_gpus / pod_gpus(group)) * replicas == group["replicas"], "pods per replica x replicas"
        per_node = plan["gpus_per_node"]
        assert opts["placement_group_strategy"] == ("STRICT_PACK" if group_gpus <= per_node else "PACK")
    else:
        assert pod_gpus(group) == 0
    return plan


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gpu", GPUS)
def test_finetune_pods_scaling_config_and_fsdp_agree(model: str, method: str, gpu: str) -> None:
    hp = {"micro_batch_size": 1, "gradient_checkpointing": True}
    spec = parse_spec("finetune", {"name": "m", "base_model": model, "method": method, "data": {"train": "s3://b/t.jsonl"},
                                   "hyperparameters": hp, "resources": {"gpu_type": gpu}})
    expected = plan_training(model, method, gpu, 2048, 1, 16, True, cpus_per_worker=1.0)
    cr = with_uid(finetune_job_cr(spec, "ns"))
    if not expected.fits:
        with pytest.raises(ResolveError, match="does not fit"):
            finetune.rayjob_for(cr, CFG)
        return
    plan = assert_job_agrees(finetune.rayjob_for(cr, CFG))
    assert plan["use_gpu"] and plan["workers"] == expected.placement.workers
    assert (plan["strategy"] == "fsdp") == (expected.placement.workers > 1), "FSDP exactly when one GPU cannot hold the model"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("gpu", GPUS)
def test_serving_pods_and_placement_group_agree(model: str, gpu: str) -> None:
    spec = parse_spec("serve", {"name": "m", "engine": "vllm", "model": {"base": f"{model}-chat"}, "tensor_parallel": "auto",
                                "resources": {"gpu_type": gpu}, "autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    rs = deployment.rayservice_for(with_uid(model_deployment_cr(spec, "ns")), CFG, {})
    plan = assert_service_agrees(rs)
    assert plan["tensor_parallel"] == plan_serving(f"{model}-chat", gpu).tensor_parallel


@pytest.mark.parametrize("path", SPECS, ids=[str(p.relative_to(REPO)) for p in SPECS])
def test_every_shipped_spec_agrees_across_operator_job_and_app(path: Path) -> None:
    spec = load_spec(path)
    if spec.__class__.__name__ == "FineTuneSpec":
        assert_job_agrees(finetune.rayjob_for(with_uid(finetune_job_cr(spec, "ns")), CFG))
        return
    registry = {ref: {"ref": ref, "version": 3, "base_model": spec.model.base or "llama2-7b-chat", "lora_rank": 16}
                for ref in deployment.lookup_refs(spec)}
    assert_service_agrees(deployment.rayservice_for(with_uid(model_deployment_cr(spec, "ns")), CFG, registry))


# ---------------------------------------------------------------------------- the bugs one plan fixes


def test_gpu_type_without_gpus_per_worker_trains_on_the_gpus_it_was_given() -> None:
    """jobs/k8s/finetune-7b-qlora-gpu.yaml: GPU pods, and the job's ScalingConfig asks for GPUs (it used to say use_gpu=False)."""
    spec = load_spec(REPO / "jobs/k8s/finetune-7b-qlora-gpu.yaml")
    assert spec.resources.gpu_type and not spec.resources.gpus_per_worker
    rayjob = finetune.rayjob_for(with_uid(finetune_job_cr(spec, "ns")), CFG)
    plan, scaling = job_side(rayjob)
    assert pod_gpus(rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]) == 1
    assert scaling.use_gpu is True and scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1.0} and plan["backend"] == "nccl"


def test_tp_auto_from_the_registry_lineage_sizes_pods_and_placement_group_alike() -> None:
    """model.base unset: the operator asks the registry for the base, so the RayService's GPUs and the
    replica's placement group come from the same planner answer (the operator used to say tp=1)."""
    reg = "models:/big-bot@production"
    spec = parse_spec("serve", {"name": "lineage", "engine": "vllm", "model": {"registry": reg}, "tensor_parallel": "auto",
                                "resources": {"gpu_type": "a100-80gb"}})
    assert deployment.lookup_refs(spec) == [reg]
    rs = deployment.rayservice_for(with_uid(model_deployment_cr(spec, "ns")), CFG,
                                   {reg: {"ref": reg, "version": 5, "base_model": "llama2-70b-chat", "lora_rank": 16}})
    plan = assert_service_agrees(rs)
    tp = plan_serving("llama2-70b-chat", "a100-80gb").tensor_parallel
    assert tp > 1 and plan["tensor_parallel"] == tp and len(plan["placement"]["bundles"]) == tp
    assert pod_gpus(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]) == tp
    with pytest.raises(ResolveError, match="model.base"):  # without the lineage it is refused, never guessed
        deployment.rayservice_for(with_uid(model_deployment_cr(spec, "ns")), CFG, {})


def test_the_registry_poll_interval_is_the_specs_unless_the_operator_overrides_it(monkeypatch) -> None:
    from llmoperator import handlers

    slow = with_uid(model_deployment_cr(parse_spec("serve", {"name": "slow", "model": {"base": "llama2-7b-chat", "registry": "models:/b@prod"},
                                                            "registry_poll_s": 120}), "ns"))
    plan = deployment.plan_for(slow, OperatorConfig(), {"models:/b@prod": "2"})
    assert plan["registry_poll_s"] == 120 and plan.source("registry_poll_s") == "spec"
    handlers._polled[handlers._key(slow)] = (1000.0, plan["registry_poll_s"])
    assert not handlers.poll_due(slow, now=1100.0) and handlers.poll_due(slow, now=1120.0)
    monkeypatch.setenv("LLMOP_REGISTRY_POLL_S", "7")
    cfg = OperatorConfig.from_env()
    assert cfg.registry_poll_s == 7.0
    forced = deployment.plan_for(slow, cfg, {"models:/b@prod": "2"})
    assert forced["registry_poll_s"] == 7.0 and forced.source("registry_poll_s") == "target"


@pytest.mark.parametrize("gpu", ["a10g-24gb", "a100-80gb"])
def test_a_sweep_over_lora_rank_and_workers_sizes_its_group_for_max_concurrent_trials(gpu: str) -> None:
    spec = parse_spec("finetune", {"name": "sw", "base_model": "llama2-7b", "method": "qlora", "data": {"train": "s3://b/t.jsonl"},
                                   "hyperparameters": {"micro_batch_size": 1, "gradient_checkpointing": True}, "resources": {"gpu_type": gpu},
                                   "sweep": {"params": {"lora.rank": [8, 64], "resources.workers": [1, 2]}, "max_concurrent": 3}})
    trials = assert_sweep_agrees(finetune.rayjob_for(with_uid(finetune_job_cr(spec, "ns")), CFG))
    assert len(trials) == 4 and sorted(t["workers"] for t in trials) == [1, 1, 2, 2]


EVAL_SPECS = sorted(p for p in (REPO / "jobs").rglob("*.yaml")
                    if p.name != "kustomization.yaml" and load_spec(p).__class__.__name__ == "EvaluationSpec")


@pytest.mark.parametrize("path", EVAL_SPECS, ids=[str(p.relative_to(REPO)) for p in EVAL_SPECS])
def test_every_shipped_eval_spec_runs_its_driver_on_the_pod_sized_for_it(path: Path) -> None:
    """An EvaluationJob's driver reserves (entrypoint resources) no more than its worker pod offers and
    more than the head does, so Ray can only place it on that pod, with its GPUs."""
    from llmplatform.backends.k8s import evaluation_job_cr

    from llmoperator.reconcile import evaluation

    spec = load_spec(path)
    rayjob = evaluation.rayjob_for(with_uid(evaluation_job_cr(spec, "ns")), CFG)["spec"]
    [group] = rayjob["rayClusterSpec"]["workerGroupSpecs"]
    cpu = group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    pod_cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert rayjob["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert 0 < rayjob["entrypointNumCpus"] <= pod_cpus and group["replicas"] == 1
    assert rayjob.get("entrypointNumGpus", 0) == pod_gpus(group) == spec.resources.gpus
