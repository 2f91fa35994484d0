"""EvaluationJob -> KubeRay RayJob (pure).

`parse_evaluation(cr)` validates the CR's spec with the same `EvaluationSpec` `platformctl eval
submit` uses (name from metadata.name; unknown scorers and bad scorer params are refused here,
before any pod starts); `rayjob_for(cr, cfg)` builds the RayJob: a head that runs nothing (no CPUs
or GPUs offered to Ray) and one worker pod of the spec's `resources`, all of which the driver
reserves as entrypoint resources, so the evaluation (one process: engine, scorers, MLflow) runs on
that pod and its GPUs. The entrypoint is `python -m llmplatform.evaluation.entrypoint --spec-json
'<spec>' --job-id ID`; the MLflow server is the pods' `MLFLOW_TRACKING_URI` (the platform Secret)
and each run is tagged `platform.job_id` = ID, which is how the operator finds the results.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Mapping

from llmplatform.specs import EvaluationSpec

from llmoperator.reconcile.common import (
    parse_cr_spec,
    HEAD_PORTS, LABEL_EVALUATION, RAY_API_VERSION, RAY_VERSION, OperatorConfig, child_metadata, pod_template, quantity_gi, tolerations_from,
)
from llmoperator.reconcile.finetune import _cpu, _deadline

ENTRYPOINT_MODULE = "llmplatform.evaluation.entrypoint"


def parse_evaluation(cr: Mapping[str, Any]) -> EvaluationSpec:
    """The CR's spec as an EvaluationSpec; raises SpecError naming every bad field."""
    return parse_cr_spec(cr, "EvaluationJob", "eval")  # type: ignore[return-value]


def job_id(cr: Mapping[str, Any]) -> str:
    """`<name>-<8 of the uid>`: one per EvaluationJob object (an evaluation has nothing to resume), the
    `platform.job_id` tag of its MLflow runs."""
    return f"{cr['metadata']['name']}-{str(cr['metadata'].get('uid', '')).replace('-', '')[:8]}"


def entrypoint(spec: EvaluationSpec, job: str) -> str:
    spec_json = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return f"python -m {ENTRYPOINT_MODULE} --spec-json {shlex.quote(spec_json)} --job-id {shlex.quote(job)}"


def rayjob_for(cr: Mapping[str, Any], cfg: OperatorConfig) -> dict:
    """The RayJob object for an EvaluationJob CR (raises SpecError for a spec that can't run)."""
    spec = parse_evaluation(cr)
    cfg = cfg.for_cr(spec.cluster)
    res = spec.resources
    labels = {LABEL_EVALUATION: cr["metadata"]["name"]}
    head = pod_template(container_name="ray-head", cfg=cfg, cpu=cfg.head_cpu, memory=cfg.head_memory, ports=HEAD_PORTS, labels=labels)
    worker = pod_template(container_name="ray-worker", cfg=cfg, cpu=_cpu(res.cpus), memory=quantity_gi(res.memory_gb), gpus=res.gpus,
                          node_selector=res.node_selector, tolerations=tolerations_from(res.tolerations), labels=labels)
    rayjob_spec: dict[str, Any] = {
        "entrypoint": entrypoint(spec, job_id(cr)),
        # the driver is the whole job: it holds the worker pod's CPUs and GPUs, so it runs there
        "entrypointNumCpus": res.cpus,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
        "backoffLimit": cfg.backoff_limit,
        "activeDeadlineSeconds": _deadline(cr, cfg),
        "submitterConfig": {"backoffLimit": 2},
        "metadata": {"evaluationjob": cr["metadata"]["name"], "platform_job_id": job_id(cr), "dataset": spec.dataset.name},
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"}, "template": head},
            "workerGroupSpecs": [{
                "groupName": "gpu-workers" if res.gpus else "cpu-workers",
                "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                "rayStartParams": {},
                "template": worker,
            }],
        },
    }
    if res.gpus:
        rayjob_spec["entrypointNumGpus"] = res.gpus
    return {"apiVersion": RAY_API_VERSION, "kind": "RayJob", "metadata": child_metadata(cr, LABEL_EVALUATION, cfg), "spec": rayjob_spec}
