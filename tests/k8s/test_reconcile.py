"""The pure reconcile functions: FineTuneJob -> RayJob, ModelDeployment -> RayService, status maps.

Every object a builder returns is validated against KubeRay v1.7.0's CRD schema (unknown fields
rejected), so a field KubeRay doesn't know fails here, not on a cluster.
"""

from __future__ import annotations

import shlex

import pytest
import yaml

from llmplatform.backends.k8s import finetune_job_cr, model_deployment_cr
from llmplatform.errors import SpecError
from llmplatform.resolve import Resolved, ResolveError, served_spec
from llmplatform.specs import parse_spec

from llmoperator.reconcile import deployment, finetune, status
from llmoperator.reconcile.common import OperatorConfig

CFG = OperatorConfig(image="registry.example/llm-platform:1.2.3")
NOW = "2026-11-27T12:00:00Z"


def ft_cr(**spec) -> dict:
    body = {"name": "job-a", "base_model": "llama2-7b", "data": {"train": "s3://b/train.jsonl"}, **spec}
    cr = finetune_job_cr(parse_spec("finetune", body), "ns")
    cr["metadata"]["uid"] = "u-1"
    return cr


def md_cr(**spec) -> dict:
    body = {"name": "chat", "model": {"base": "llama2-7b-chat"}, **spec}
    cr = model_deployment_cr(parse_spec("serve", body), "ns")
    cr["metadata"]["uid"] = "u-2"
    return cr


def workers_of(obj: dict, key: str = "rayClusterSpec") -> dict:
    return obj["spec"][key]["workerGroupSpecs"][0]


def gpu_limit(group: dict) -> int | None:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")


# ---------------------------------------------------------------------------- RayJob


def test_rayjob_takes_workers_gpus_and_placement_from_the_spec(manifest_validator) -> None:
    cr = ft_cr(resources={"workers": 4, "gpus_per_worker": 2, "node_selector": {"pool": "h100"},
                          "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]})
    rayjob = finetune.rayjob_for(cr, CFG)
    manifest_validator.validate(rayjob)
    group = workers_of(rayjob)
    pod = group["template"]["spec"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    assert gpu_limit(group) == 2 and pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["containers"][0]["image"] == "registry.example/llm-platform:1.2.3"
    assert {"secretRef": {"name": "llm-platform-object-store", "optional": True}} in pod["containers"][0]["envFrom"]


def test_planner_sizes_gpu_workers_when_only_a_gpu_type_is_given() -> None:
    from llmplatform.planner import plan_training

    spec = {"method": "lora", "base_model": "llama2-70b", "resources": {"workers": 1, "gpu_type": "a100-80gb"},
            "hyperparameters": {"micro_batch_size": 1, "gradient_checkpointing": True}}
    plan = plan_training("llama2-70b", "lora", "a100-80gb", seq_len=2048, micro_batch=1, gradient_checkpointing=True, cpus_per_worker=1.0)
    group = workers_of(finetune.rayjob_for(ft_cr(**spec), CFG))
    assert group["replicas"] == plan.placement.workers > 1  # 70B bf16 LoRA does not fit one GPU
    assert gpu_limit(group) == plan.placement.gpus_per_worker


def test_fractional_gpus_share_a_pod_and_cpu_jobs_ask_for_no_gpu() -> None:
    shared = workers_of(finetune.rayjob_for(ft_cr(resources={"workers": 4, "gpus_per_worker": 0.5}), CFG))
    assert shared["replicas"] == 2 and gpu_limit(shared) == 1
    cpu = finetune.rayjob_for(ft_cr(base_model="llama2-tiny", resources={"workers": 2}), CFG)
    assert gpu_limit(workers_of(cpu)) is None and workers_of(cpu)["groupName"] == "cpu-workers"


def test_entrypoint_carries_the_resolved_plan_safely_quoted() -> None:
    cr = ft_cr(data={"train": "s3://b/it's here.jsonl", "system_prompt": "Say \"hi\"; rm -rf /"})
    argv = shlex.split(finetune.rayjob_for(cr, CFG)["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "llmplatform.training.entrypoint", "--resolved-json"] and argv[5:] == ["--job-id", finetune.job_id(cr)]
    spec = Resolved.from_dict(yaml.safe_load(argv[4])).spec
    assert spec.data.train == "s3://b/it's here.jsonl" and spec.data.system_prompt == "Say \"hi\"; rm -rf /" and spec.name == "job-a"


def test_job_id_is_stable_across_resubmits_and_changes_with_name_namespace_or_spec() -> None:
    """The job id is the Ray Train run name: the same FineTuneJob resubmitted (a new uid) must get
    the same id to resume its checkpoints; any other job must not share them."""
    cr = ft_cr(lora={"rank": 8})
    resubmitted = {**ft_cr(lora={"rank": 8}), "metadata": {**cr["metadata"], "uid": "u-2", "resourceVersion": "99", "generation": 1}}
    resubmitted["spec"] = dict(reversed(list(cr["spec"].items())))  # key order is not part of the spec
    assert finetune.job_id(cr) == finetune.job_id(resubmitted)
    assert finetune.job_id(cr).startswith("job-a-") and len(finetune.job_id(cr).split("-")[-1]) == 8
    other_ns = {**cr, "metadata": {**cr["metadata"], "namespace": "team-b"}}
    other_spec = ft_cr(lora={"rank": 16})
    renamed = ft_cr(name="job-b", lora={"rank": 8})
    ids = {finetune.job_id(c) for c in (cr, other_ns, other_spec, renamed)}
    assert len(ids) == 4
    assert finetune.rayjob_for(resubmitted, CFG)["spec"]["entrypoint"] == finetune.rayjob_for(cr, CFG)["spec"]["entrypoint"]


def test_resume_advice_says_how_to_resubmit_and_whether_checkpoints_survived() -> None:
    shared = finetune.resume_advice(ft_cr(checkpoint={"storage_uri": "s3://ckpt/runs"}), CFG)
    cr = ft_cr(checkpoint={"storage_uri": "s3://ckpt/runs"})
    assert "kubectl delete finetunejob job-a -n ns" in shared and "kubectl apply -f" in shared
    assert f"resumes from the last checkpoint in s3://ckpt/runs/{finetune.job_id(cr)}" in shared
    local = finetune.resume_advice(ft_cr(), CFG)  # default: PLATFORM_HOME inside the pod
    assert "/home/ray/.llm-platform/checkpoints" in local and "starts from step 0" in local and "checkpoint.storage_uri" in local
    volume = finetune.resume_advice(ft_cr(checkpoint={"storage_uri": "/models/checkpoints"}), CFG)
    assert "volume every Ray pod mounts" in volume
    running = {"phase": "Running", "rayJobName": "job-a"}
    out = status.finetune_status(rj(jobDeploymentStatus="Running", jobStatus="RUNNING", rayClusterName="rc-1"), running, NOW, cluster_gone=True, resume=shared)
    assert out["reason"] == "ClusterLost" and shared in out["message"]


def test_deadline_annotation_and_invalid_spec() -> None:
    cr = ft_cr()
    cr["metadata"]["annotations"] = {"llmplatform.io/active-deadline-seconds": "7200"}
    assert finetune.rayjob_for(cr, CFG)["spec"]["activeDeadlineSeconds"] == 7200
    cr["metadata"]["annotations"] = {"llmplatform.io/active-deadline-seconds": "soon"}
    with pytest.raises(SpecError, match="active-deadline-seconds"):
        finetune.rayjob_for(cr, CFG)
    bad = ft_cr()
    bad["spec"]["lora"] = {"rank": 0, "dropout": 2}
    with pytest.raises(SpecError) as err:
        finetune.rayjob_for(bad, CFG)
    assert {p.location for p in err.value.problems} == {"lora.rank", "lora.dropout"}


def test_a_job_that_cannot_fit_is_a_spec_error_naming_the_fix() -> None:
    cr = ft_cr(base_model="llama2-70b", method="lora", resources={"gpu_type": "a100-80gb"}, hyperparameters={"micro_batch_size": 64})
    with pytest.raises(ResolveError, match="does not fit"):
        finetune.rayjob_for(cr, CFG)


# ---------------------------------------------------------------------------- RayJob status


def rj(**st) -> dict:
    return {"metadata": {"name": "job-a"}, "spec": {"activeDeadlineSeconds": 3600}, "status": st}


@pytest.mark.parametrize("kuberay, phase, reason", [
    ({}, "Pending", "Waiting"),
    ({"jobDeploymentStatus": "Initializing"}, "Initializing", "ClusterStarting"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, "Running", "JobPending"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running", "JobRunning"),
    ({"jobDeploymentStatus": "Retrying", "failed": 1}, "Running", "Retrying"),
    ({"jobDeploymentStatus": "Suspended"}, "Pending", "Suspended"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded", "JobSucceeded"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"}, "Succeeded", "JobSucceeded"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "FAILED"}, "Failed", "AppFailed"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "Cancelled", "JobStopped"),
    ({"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed"}, "Failed", "SubmissionFailed"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "Failed", "DeadlineExceeded"),
    ({"jobDeploymentStatus": "Failed", "reason": "JobDeploymentStatusTransitionGracePeriodExceeded"}, "Failed", "JobDeploymentStatusTransitionGracePeriodExceeded"),
    ({"jobDeploymentStatus": "Complete"}, "Failed", "NoJobStatus"),
])
def test_rayjob_status_maps_to_phase(kuberay: dict, phase: str, reason: str) -> None:
    out = status.finetune_status(rj(**kuberay), {"phase": "Pending", "rayJobName": "job-a"}, NOW)
    assert (out.get("phase", "Pending"), out["reason"]) == (phase, reason)
    if phase in status.TERMINAL:
        assert out["completionTime"] == NOW


def test_cluster_loss_and_rayjob_loss_fail_only_unfinished_jobs() -> None:
    running = {"phase": "Running", "rayJobName": "job-a"}
    out = status.finetune_status(rj(jobDeploymentStatus="Running", jobStatus="RUNNING", rayClusterName="rc-1"), running, NOW, cluster_gone=True)
    assert out["phase"] == "Failed" and out["reason"] == "ClusterLost" and "rc-1" in out["message"]
    assert status.finetune_status(None, running, NOW)["reason"] == "RayJobDeleted"
    done = {"phase": "Succeeded", "rayJobName": "job-a"}
    assert status.finetune_status(None, done, NOW) == {}
    assert status.finetune_status(rj(jobDeploymentStatus="Failed", reason="DeadlineExceeded"), done, NOW) == {}


def test_status_update_is_empty_when_nothing_changed() -> None:
    first = status.finetune_status(rj(jobDeploymentStatus="Running", jobStatus="RUNNING", jobId="j1"), {}, NOW)
    assert status.finetune_status(rj(jobDeploymentStatus="Running", jobStatus="RUNNING", jobId="j1"), first, "later") == {}


def test_progress_text() -> None:
    assert status.progress_text(120, 500) == "120/500 steps (24%)"
    assert status.progress_text(7, None) == "7 steps" and status.progress_text(None, 10) is None


# ---------------------------------------------------------------------------- RayService


def test_rayservice_runs_our_app_with_the_spec_as_args(manifest_validator) -> None:
    rs = deployment.rayservice_for(md_cr(tensor_parallel=4, resources={"gpus_per_shard": 1}), CFG, {})
    manifest_validator.validate(rs)
    [app] = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "llmplatform.serving.app:build_app" and app["name"] == "chat"
    plan = Resolved.from_dict(app["args"])
    assert plan.spec.tensor_parallel == 4 and plan["tensor_parallel"] == 4
    group = workers_of(rs, "rayClusterConfig")
    assert gpu_limit(group) == 4 and group["replicas"] == 1


def test_tp_beyond_a_node_spans_pods_and_auto_asks_the_planner() -> None:
    from llmplatform.planner import plan_serving

    wide = workers_of(deployment.rayservice_for(md_cr(tensor_parallel=16, resources={"gpus_per_shard": 1}, autoscaling={"min_replicas": 1, "max_replicas": 2}), CFG, {}), "rayClusterConfig")
    assert gpu_limit(wide) == 8 and (wide["replicas"], wide["maxReplicas"]) == (2, 4)
    auto = md_cr(model={"base": "llama2-70b-chat"}, tensor_parallel="auto", resources={"gpu_type": "a100-80gb"})
    group = workers_of(deployment.rayservice_for(auto, CFG, {}), "rayClusterConfig")
    assert gpu_limit(group) == plan_serving("llama2-70b-chat", "a100-80gb").tensor_parallel > 1


def test_alias_refs_are_pinned_and_only_the_serve_config_changes() -> None:
    cr = md_cr(model={"base": "llama2-7b-chat", "registry": "models:/bot@production", "adapters": [{"name": "x", "source": "models:/x@staging"}]})
    spec = deployment.parse_serve(cr)
    assert deployment.alias_refs(spec) == ["models:/bot@production", "models:/x@staging"]
    v3 = deployment.rayservice_for(cr, CFG, {"models:/bot@production": "3", "models:/x@staging": "1"})
    plan = Resolved.from_dict(yaml.safe_load(v3["spec"]["serveConfigV2"])["applications"][0]["args"])
    served = served_spec(plan)  # what the replicas serve: the versions the operator pinned
    assert served.model.registry == "models:/bot/3" and served.model.adapters[0].source == "models:/x/1"
    assert deployment.served_version(plan) == "bot/3"
    v4 = deployment.rayservice_for(cr, CFG, {"models:/bot@production": "4", "models:/x@staging": "1"})
    assert deployment.update_for(v3, v4) == ("serve-config", {"spec": {"serveConfigV2": v4["spec"]["serveConfigV2"]}})
    assert deployment.update_for(v4, v4) == ("none", {})
    bigger = deployment.rayservice_for(md_cr(model=cr["spec"]["model"], tensor_parallel=2, resources={"gpus_per_shard": 1}), CFG, {"models:/bot@production": "4", "models:/x@staging": "1"})
    assert deployment.update_for(v4, bigger)[0] == "cluster"


@pytest.mark.parametrize("conditions, service_status, phase", [
    ([], "", "Deploying"),
    ([{"type": "Ready", "status": "True"}], "", "Ready"),
    ([], "Running", "Ready"),
    ([{"type": "Ready", "status": "True"}, {"type": "UpgradeInProgress", "status": "True", "reason": "NewCluster"}], "", "Updating"),
    ([{"type": "Ready", "status": "False", "reason": "ServeDeploymentUnhealthy", "message": "replica crashed"}], "", "Unhealthy"),
])
def test_rayservice_status_maps_to_phase(conditions: list, service_status: str, phase: str) -> None:
    rs = {"metadata": {"name": "chat", "namespace": "ns"}, "status": {"conditions": conditions, "serviceStatus": service_status}}
    out = status.deployment_status(rs, {}, NOW)
    assert out["phase"] == phase and out["endpoint"] == "http://chat-serve-svc.ns.svc:8000"


def test_scale_to_zero_and_the_engine_metric_reach_the_worker_group_and_serve_config(manifest_validator) -> None:
    cr = md_cr(tensor_parallel=2, resources={"gpus_per_shard": 1},
               autoscaling={"min_replicas": 0, "max_replicas": 3, "metric": "queue_depth", "target": 4, "downscale_to_zero_delay_s": 600})
    rs = deployment.rayservice_for(cr, CFG, {})
    manifest_validator.validate(rs)
    group = workers_of(rs, "rayClusterConfig")
    # KubeRay's autoscaler may remove every worker pod once Serve has no replica left, and add up to 3 replicas' pods
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 1, 3)
    from llmplatform.serving.placement import engine_options

    plan = Resolved.from_dict(yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"])
    scaling = engine_options(plan)["autoscaling_config"]
    assert scaling["min_replicas"] == 0 and scaling["downscale_to_zero_delay_s"] == 600
    assert scaling["policy"]["policy_kwargs"]["metric"] == "queue_depth" and scaling["policy"]["policy_kwargs"]["target"] == 4
