"""FineTuneJob -> KubeRay RayJob (pure).

`parse_finetune(cr)` validates the CR's spec with the same `FineTuneSpec` the CLI uses (name from
metadata.name); `plan_for(cr, cfg)` resolves it once (`llmplatform.resolve`); `rayjob_for(cr, cfg)`
builds the RayJob from that plan: a CPU head, one worker group of the plan's pods (one Ray pod per
Ray Train worker; fractional GPUs share a pod), GPU requests = limits, the spec's node selector and
tolerations, the platform image, MLflow/object-store/Hugging Face Secrets as env, the model-cache
PVC when configured (operator settings, overridden by the CR's `cluster:` section), and the
training entrypoint `python -m llmplatform.training.entrypoint --resolved-json '<plan>' --job-id ID`,
so the workers run with exactly the numbers the pods were sized for.
A FineTuneJob with a `sweep:` section is a hyperparameter sweep: every trial is built
(`sweep_params.plan_from_section`, as `platformctl finetune sweep` does) and resolved here, once;
the RayJob runs `python -m llmplatform.training.sweep --sweep-json '<sweep + trial plans>'
--resolved-json '<plan>' --job-id ID` on a worker group sized for `max_concurrent` trials
(`llmplatform.resolve.sweep_pods`).
KubeRay shuts the cluster down when the job ends (`shutdownAfterJobFinishes`, TTL), never retries
by building a second cluster unless told to (`backoffLimit`), and kills it at the deadline.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any, Mapping

from llmplatform.errors import Problem, SpecError
from llmplatform.resolve import Facts, Resolved, ResolveError, resolve, sweep_pods
from llmplatform.specs import FineTuneSpec

from llmoperator.reconcile.common import (
    cr_source, parse_cr_spec,
    ANNOTATION_DEADLINE, HEAD_PORTS, LABEL_FINETUNE, POD_PLATFORM_HOME, RAY_API_VERSION, RAY_VERSION, OperatorConfig,
    child_metadata, pod_template, quantity_gi, tolerations_from,
)

ENTRYPOINT_MODULE = "llmplatform.training.entrypoint"
SWEEP_MODULE = "llmplatform.training.sweep"


def parse_finetune(cr: Mapping[str, Any]) -> FineTuneSpec:
    """The CR's spec as a FineTuneSpec; raises SpecError naming every bad field."""
    return parse_cr_spec(cr, "FineTuneJob", "finetune")  # type: ignore[return-value]


def plan_for(cr: Mapping[str, Any], cfg: OperatorConfig) -> Resolved:
    """The FineTuneJob's resolved plan on this cluster (raises SpecError / ResolveError naming every problem)."""
    spec = parse_finetune(cr)
    plan = resolve(spec, Facts(target="k8s", platform_home=POD_PLATFORM_HOME))
    if plan.problems:
        raise ResolveError(cr_source("FineTuneJob", cr), list(plan.problems))
    return plan


def sweep_for(cr: Mapping[str, Any], plan: Resolved) -> tuple[str, dict]:
    """A sweep FineTuneJob's `--sweep-json` text (the sweep and every trial's resolved plan) and its worker
    pods; SpecError naming the `sweep.` field, or ResolveError naming the trial, for a sweep that can't run."""
    from llmplatform.training.sweep_params import SweepError, plan_from_section, sweep_document

    spec: FineTuneSpec = plan.spec  # type: ignore[assignment]
    try:
        sweep, specs = plan_from_section(spec.sweep, spec)  # type: ignore[arg-type]
        trials = [resolve(s, Facts(target="k8s", platform_home=POD_PLATFORM_HOME)) for s in specs]
        problems = [Problem(f"sweep trial {i} ({', '.join(f'{k}={v!r}' for k, v in sweep.overrides[i].items())}): {p.location}", p.message, p.given, p.accepted)
                    for i, t in enumerate(trials) for p in t.problems]
        if problems:
            raise ResolveError(cr_source("FineTuneJob", cr), problems)
        doc = sweep_document(sweep, [t.to_dict() for t in trials], cli=False)
    except SweepError as exc:
        raise SpecError(cr_source("FineTuneJob", cr), [Problem(exc.field, str(exc))]) from None
    return doc, sweep_pods(trials, sweep.max_concurrent)


def job_id(cr: Mapping[str, Any]) -> str:
    """The platform job id, `<name>-<8 hex>`: a hash of namespace/name and the canonical spec (sorted
    JSON), never the uid. It is the Ray Train run name (with the checkpoint storage: the run's
    checkpoint directory) and MLflow's `platform.job_id` tag, so a FineTuneJob deleted and
    resubmitted with the same name and spec after its cluster died resumes from its last
    checkpoint; a changed spec is a new run, and a new name always is."""
    meta = cr["metadata"]
    canonical = json.dumps({"namespace": meta.get("namespace", ""), "name": meta["name"], "spec": cr.get("spec") or {}},
                           sort_keys=True, separators=(",", ":"))
    return f"{meta['name']}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def resume_advice(cr: Mapping[str, Any], cfg: OperatorConfig) -> str:
    """How to resume a FineTuneJob whose cluster was lost, and whether its checkpoints survived:
    only storage outside the pods (an object store, or a volume every pod mounts) outlives them."""
    ns, name = cr["metadata"].get("namespace", "default"), cr["metadata"]["name"]
    how = (f"resubmit it with the same name and spec: `kubectl delete finetunejob {name} -n {ns}`, then `kubectl apply -f` the same "
           f"manifest (or `platformctl finetune submit` the same spec with `--target k8s`)")
    storage = plan_for(cr, cfg)["checkpoint_storage"]
    where = f"{storage.rstrip('/')}/{job_id(cr)}"
    if "://" in storage:
        return f"{how}; it resumes from the last checkpoint in {where}"
    if storage.startswith(POD_PLATFORM_HOME):
        return (f"its checkpoints were on the pods' own disk ({where}) and were lost with the cluster, so a resubmit starts from step 0; "
                f"set checkpoint.storage_uri to an object store (s3://...) or a path on a shared volume to make jobs resumable, then {how}")
    return f"{how}; it resumes from the last checkpoint in {where} if that path is on a volume every Ray pod mounts (else from step 0)"


def entrypoint(plan: Resolved, job: str, sweep_json: str | None = None) -> str:
    """The shell command KubeRay submits: the training entrypoint with the resolved plan as JSON, or
    (`sweep_json`) the sweep driver with the trials' plans too."""
    plan_json = json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))
    if sweep_json is not None:
        return (f"python -m {SWEEP_MODULE} --sweep-json {shlex.quote(sweep_json)} --resolved-json {shlex.quote(plan_json)} "
                f"--job-id {shlex.quote(job)}")
    return f"python -m {ENTRYPOINT_MODULE} --resolved-json {shlex.quote(plan_json)} --job-id {shlex.quote(job)}"


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
        raise SpecError(f"{cr.get('kind') or 'FineTuneJob'} {cr['metadata']['name']}", [Problem(f"metadata.annotations[{ANNOTATION_DEADLINE}]", "must be a positive whole number of seconds", raw, "e.g. \"86400\"")])
    return value


def rayjob_for(cr: Mapping[str, Any], cfg: OperatorConfig) -> dict:
    """The RayJob object for a FineTuneJob CR (raises SpecError / ResolveError for a spec that can't run)."""
    plan = plan_for(cr, cfg)
    spec: FineTuneSpec = plan.spec  # type: ignore[assignment]
    cfg = cfg.for_cr(spec.cluster)  # the CR's Secret / cache names beat the operator's
    sweep_json, pods = sweep_for(cr, plan) if spec.sweep is not None else (None, plan["pods"])
    res = spec.resources
    labels = {LABEL_FINETUNE: cr["metadata"]["name"]}
    head = pod_template(container_name="ray-head", cfg=cfg, cpu=cfg.head_cpu, memory=cfg.head_memory, ports=HEAD_PORTS, labels=labels)
    worker = pod_template(
        container_name="ray-worker",
        cfg=cfg,
        cpu=_cpu(pods["cpus_per_pod"]),
        memory=quantity_gi(pods["memory_gb_per_pod"]),
        gpus=pods["gpus_per_pod"],
        node_selector=res.node_selector,
        tolerations=tolerations_from(res.tolerations),
        labels=labels,
    )
    group = "gpu-workers" if pods["gpus_per_pod"] else "cpu-workers"
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": child_metadata(cr, LABEL_FINETUNE, cfg),
        "spec": {
            "entrypoint": entrypoint(plan, job_id(cr), sweep_json),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
            "backoffLimit": cfg.backoff_limit,
            "activeDeadlineSeconds": _deadline(cr, cfg),
            "submitterConfig": {"backoffLimit": 2},
            "metadata": {"finetunejob": cr["metadata"]["name"], "platform_job_id": job_id(cr), "base_model": spec.base_model, "method": spec.method,
                         **({"sweep_trials": str(len(json.loads(sweep_json)["plans"]))} if sweep_json else {})},
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    # The head holds no GPU: the driver and Train controller run there, workers hold every GPU.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": head,
                },
                "workerGroupSpecs": [{
                    "groupName": group,
                    "replicas": pods["pods"],
                    "minReplicas": pods["pods"],
                    "maxReplicas": pods["pods"],
                    "rayStartParams": {},
                    "template": worker,
                }],
            },
        },
    }
