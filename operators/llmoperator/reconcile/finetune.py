"""FineTuneJob -> KubeRay RayJob (pure).

`parse_finetune(cr)` validates the CR's spec with the same `FineTuneSpec` the CLI uses (name from
metadata.name); `rayjob_for(cr, cfg)` builds the RayJob: a CPU head, one worker group sized by the
planner (one Ray pod per Ray Train worker; fractional GPUs share a pod), GPU requests = limits,
the spec's node selector and tolerations, the platform image, MLflow/object-store Secrets as env,
and the training entrypoint `python -m llmplatform.training.entrypoint --spec-json '<json>' --job-id ID`.
KubeRay shuts the cluster down when the job ends (`shutdownAfterJobFinishes`, TTL), never retries
by building a second cluster unless told to (`backoffLimit`), and kills it at the deadline.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from typing import Any, Mapping

from llmplatform.specs import FineTuneSpec, parse_spec

from llmoperator.reconcile.common import (
    ANNOTATION_DEADLINE, HEAD_PORTS, LABEL_FINETUNE, RAY_API_VERSION, RAY_VERSION, OperatorConfig,
    child_metadata, pod_template, quantity_gi, tolerations_from,
)

ENTRYPOINT_MODULE = "llmplatform.training.entrypoint"


@dataclass(frozen=True)
class WorkerLayout:
    """How Ray Train workers map onto Kubernetes pods."""

    pods: int  # worker-group replicas
    gpus_per_pod: int  # nvidia.com/gpu per pod (whole GPUs)
    cpus_per_pod: float
    memory_gb_per_pod: float
    train_workers: int  # Ray Train workers (ScalingConfig.num_workers)
    gpus_per_worker: float


def parse_finetune(cr: Mapping[str, Any]) -> FineTuneSpec:
    """The CR's spec as a FineTuneSpec; raises SpecError naming every bad field."""
    body = dict(cr.get("spec") or {})
    body.setdefault("name", cr["metadata"]["name"])
    source = f"FineTuneJob {cr['metadata'].get('namespace', '')}/{cr['metadata']['name']}"
    return parse_spec("finetune", body, source)  # type: ignore[return-value]


def _planned(spec: FineTuneSpec) -> tuple[int, float, float | None]:
    """(workers, gpus_per_worker, memory_gb_per_worker): the spec's, completed by the planner.

    When the spec names a GPU type but no GPUs per worker, `llmplatform.planner.plan_training`
    decides the smallest placement that fits (never fewer workers than the spec asks for). A
    base model the catalog doesn't know (an HF id, a path) keeps the spec's numbers.
    """
    res = spec.resources
    workers, gpus, memory = res.workers, res.gpus_per_worker, res.memory_gb_per_worker
    if not res.gpu_type or gpus:
        return workers, gpus, memory
    from llmplatform.errors import PlatformError, Problem, SpecError
    from llmplatform.planner import plan_training

    hp = spec.hyperparameters
    try:
        plan = plan_training(spec.base_model, spec.method, res.gpu_type, seq_len=spec.data.max_seq_length,
                             micro_batch=hp.micro_batch_size, lora_rank=spec.lora.rank,
                             gradient_checkpointing=hp.gradient_checkpointing, cpus_per_worker=res.cpus_per_worker)
    except (PlatformError, KeyError, ValueError) as exc:
        if "gpu" in str(exc).lower():
            raise SpecError("resources.gpu_type", [Problem("resources.gpu_type", str(exc), res.gpu_type)]) from exc
        return workers, 1.0, memory  # model unknown to the catalog: one GPU per worker
    if not plan.fits:
        raise SpecError("resources", [Problem("resources.gpu_type", f"{spec.base_model} {spec.method} does not fit on {res.gpu_type}: " + "; ".join(plan.notes), res.gpu_type, "a larger GPU, qlora, or a shorter max_seq_length")])
    return max(workers, plan.placement.workers), float(plan.placement.gpus_per_worker), memory


def worker_layout(spec: FineTuneSpec) -> WorkerLayout:
    """Pods for the spec's workers: whole-GPU workers get their own pod; fractional ones share."""
    workers, gpus, memory = _planned(spec)
    cpus = spec.resources.cpus_per_worker
    if gpus >= 1 or gpus == 0:
        per_pod, gpus_per_pod = 1, int(gpus)
    else:  # e.g. 0.5 GPU/worker -> 2 workers share one GPU pod
        per_pod, gpus_per_pod = max(1, int(1 / gpus)), 1
    pods = math.ceil(workers / per_pod)
    mem_per_worker = memory or (16.0 if gpus else 4.0)
    return WorkerLayout(pods, gpus_per_pod, cpus * per_pod + 1, mem_per_worker * per_pod, workers, gpus)


def job_id(cr: Mapping[str, Any]) -> str:
    """The platform job id: name + uid prefix. Unique per FineTuneJob object (a reused Ray Train run
    name would silently resume an old run), stable across KubeRay retries of the same object (a
    retry resumes from the last checkpoint). MLflow tags the run `platform.job_id` with it."""
    return f"{cr['metadata']['name']}-{str(cr['metadata'].get('uid', 'nouid')).replace('-', '')[:8]}"


def entrypoint(spec: FineTuneSpec, job: str) -> str:
    """The shell command KubeRay submits: the training entrypoint with the whole spec as JSON."""
    spec_json = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return f"python -m {ENTRYPOINT_MODULE} --spec-json {shlex.quote(spec_json)} --job-id {shlex.quote(job)}"


def _cpu(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"


def _deadline(cr: Mapping[str, Any], cfg: OperatorConfig) -> int:
    raw = (cr["metadata"].get("annotations") or {}).get(ANNOTATION_DEADLINE)
    if raw is None:
        return cfg.active_deadline_seconds
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        from llmplatform.errors import Problem, SpecError
        raise SpecError(f"FineTuneJob {cr['metadata']['name']}", [Problem(f"metadata.annotations[{ANNOTATION_DEADLINE}]", "must be a positive whole number of seconds", raw, "e.g. \"86400\"")])
    return value


def rayjob_for(cr: Mapping[str, Any], cfg: OperatorConfig) -> dict:
    """The RayJob object for a FineTuneJob CR (raises SpecError for an invalid spec)."""
    spec = parse_finetune(cr)
    layout = worker_layout(spec)
    res = spec.resources
    labels = {LABEL_FINETUNE: cr["metadata"]["name"]}
    head = pod_template(container_name="ray-head", cfg=cfg, cpu=cfg.head_cpu, memory=cfg.head_memory, ports=HEAD_PORTS, labels=labels)
    worker = pod_template(
        container_name="ray-worker",
        cfg=cfg,
        cpu=_cpu(layout.cpus_per_pod),
        memory=quantity_gi(layout.memory_gb_per_pod),
        gpus=layout.gpus_per_pod,
        node_selector=res.node_selector,
        tolerations=tolerations_from(res.tolerations),
        labels=labels,
    )
    group = "gpu-workers" if layout.gpus_per_pod else "cpu-workers"
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": child_metadata(cr, LABEL_FINETUNE, cfg),
        "spec": {
            "entrypoint": entrypoint(spec, job_id(cr)),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
            "backoffLimit": cfg.backoff_limit,
            "activeDeadlineSeconds": _deadline(cr, cfg),
            "submitterConfig": {"backoffLimit": 2},
            "metadata": {"finetunejob": cr["metadata"]["name"], "platform_job_id": job_id(cr), "base_model": spec.base_model, "method": spec.method},
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    # The head holds no GPU: the driver and Train controller run there, workers hold every GPU.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": head,
                },
                "workerGroupSpecs": [{
                    "groupName": group,
                    "replicas": layout.pods,
                    "minReplicas": layout.pods,
                    "maxReplicas": layout.pods,
                    "rayStartParams": {},
                    "template": worker,
                }],
            },
        },
    }
