"""Resolve a FineTuneSpec against what is known about the target (pure: no I/O, no Ray).

Every number the job runs with comes from here: workers, CPUs and GPUs per worker, `use_gpu` and
the collective backend, DDP or FSDP with the planner's reason, precision and quantisation, the
per-worker memory estimate, the Kubernetes pod layout, checkpoint and eval cadence, and where
the adapter is registered. The planner runs when the spec names a GPU type (or the caller does)
and the base model is in the catalog; its verdict also decides FSDP.
"""

from __future__ import annotations

import math

from llmplatform import catalog, planner
from llmplatform.errors import PlatformError, Problem
from llmplatform.gpus import get_gpu
from llmplatform.resolve.document import Derived, Facts, Resolved
from llmplatform.specs import LLAMA_LINEAR_MODULES, FineTuneSpec

K8S_PLATFORM_HOME = "/home/ray/.llm-platform"  # PLATFORM_HOME inside every Ray pod the operator builds (the image's)
DEFAULT_POD_MEMORY_GB = {True: 16.0, False: 4.0}  # per worker, GPU vs CPU, when the spec sets none
BITSANDBYTES_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")


def _targets(spec: FineTuneSpec) -> list[str]:
    targets = spec.lora.target_modules
    return list(LLAMA_LINEAR_MODULES) if "all-linear" in targets else list(targets)


def sequences_per_micro_batch(spec: FineTuneSpec) -> int:
    """Sequences in one forward: DPO runs each pair's chosen and rejected answer together."""
    return spec.hyperparameters.micro_batch_size * (2 if spec.objective == "dpo" else 1)


def _plan(spec: FineTuneSpec, gpu_type: str | None, problems: list[Problem]) -> tuple[planner.TrainingPlan | None, str]:
    """The planner's plan, or None with the reason it could not run."""
    if not gpu_type:
        return None, "no resources.gpu_type: CPU training"
    try:
        gpu = get_gpu(gpu_type)
    except PlatformError as exc:
        problems.append(Problem("resources.gpu_type", str(exc), gpu_type))
        return None, "unknown GPU type"
    try:
        shape = catalog.get_model(spec.base_model)
    except catalog.UnknownModelError:
        return None, f"{spec.base_model} is not in the catalog: the planner cannot size it"
    hp = spec.hyperparameters
    try:
        plan = planner.plan_training(shape, spec.method, gpu, spec.data.max_seq_length if spec.data.max_seq_length <= shape.context else None,
                                     sequences_per_micro_batch(spec), spec.lora.rank, hp.gradient_checkpointing, _targets(spec),
                                     cpus_per_worker=spec.resources.cpus_per_worker, lora_dropout=spec.lora.dropout)
    except planner.PlanError as exc:
        problems.append(Problem("data.max_seq_length", str(exc), spec.data.max_seq_length))
        return None, str(exc)
    if spec.data.max_seq_length > shape.context:
        problems.append(Problem("data.max_seq_length", f"exceeds {shape.name}'s context of {shape.context} tokens", spec.data.max_seq_length, f"<= {shape.context}"))
    if not plan.fits:
        why = next((n for n in plan.notes if "does not fit" in n), "")
        fixes = ([] if hp.gradient_checkpointing else ["hyperparameters.gradient_checkpointing: true"]) + \
            ["a smaller hyperparameters.micro_batch_size or data.max_seq_length"] + (["method: qlora"] if spec.method == "lora" else []) + ["a larger GPU"]
        problems.append(Problem("resources.gpu_type", f"{shape.name} {spec.method} does not fit on {gpu.name}: {why}", gpu.name, ", ".join(fixes)))
    return plan, ""


def _strategy(spec: FineTuneSpec, plan, workers: int, problems: list[Problem]) -> Derived:
    res, optimizer = spec.resources, spec.hyperparameters.optimizer
    needs_fsdp = plan is not None and plan.fits and plan.placement.fsdp
    if res.strategy != "auto":
        if needs_fsdp and res.strategy == "ddp":
            problems.append(Problem("resources.strategy", f"ddp keeps a whole copy per GPU, but the planner says one {plan.gpu} cannot hold it "
                                    f"({plan.total_gib:.1f} GiB); it needs FSDP over {plan.placement.workers} GPUs", "ddp", "fsdp or auto"))
        return Derived(res.strategy, "spec")
    if needs_fsdp:
        if optimizer in BITSANDBYTES_OPTIMIZERS:
            problems.append(Problem("hyperparameters.optimizer", f"the planner needs FSDP over {plan.placement.workers} GPUs, and bitsandbytes "
                                    "optimizers cannot step sharded parameters", optimizer, "adamw (or a larger GPU / qlora)"))
        reason = next((n for n in plan.notes if "FSDP" in n), f"FSDP over {plan.placement.workers} GPUs")
        return Derived("fsdp", "planner", reason)
    if workers > 1 and plan is not None:
        return Derived("ddp", "planner", f"one {plan.gpu} holds the whole model ({plan.per_gpu_gib:.1f} of {plan.usable_gib:.1f} GiB): each worker keeps a replica")
    if plan is not None:
        return Derived("ddp", "planner", f"one {plan.gpu} holds it ({plan.per_gpu_gib:.1f} of {plan.usable_gib:.1f} GiB)")
    return Derived("ddp", "default", "no plan (no GPU type, or a model outside the catalog): DDP")


def _objective(spec: FineTuneSpec, problems: list[Problem]) -> dict[str, Derived]:
    """The training objective and, for DPO, its loss settings and reference model."""
    source = "spec" if "objective" in spec.model_fields_set else "default"
    if spec.objective != "dpo":
        return {"objective": Derived("sft", source, "supervised: loss on the answer tokens")}
    if spec.data.packing:
        problems.append(Problem("data.packing", "packing does not work with objective dpo: each chosen and rejected answer "
                                "is scored as its own sequence", True, "false"))
    if spec.data.format not in ("auto", "preference"):
        problems.append(Problem("data.format", "objective dpo reads preference records (prompt, chosen, rejected)", spec.data.format, "auto"))
    dpo = spec.dpo
    return {
        "objective": Derived("dpo", "spec", "preference tuning on chosen/rejected pairs"),
        "dpo_beta": Derived(dpo.beta, "spec" if "beta" in dpo.model_fields_set else "default"),
        "dpo_loss_type": Derived(dpo.loss_type, "spec" if "loss_type" in dpo.model_fields_set else "default"),
        "dpo_reference": Derived("base_without_adapter", "default", "the frozen base model: the policy with its adapter disabled, no gradients"),
        "sequences_per_micro_batch": Derived(sequences_per_micro_batch(spec), "spec", "chosen + rejected per pair: the planner sizes activations for these"),
    }


def _precision(spec: FineTuneSpec, use_gpu: bool, bf16: bool) -> Derived:
    precision = spec.hyperparameters.precision
    if precision != "auto":
        return Derived(precision, "spec")
    if use_gpu:
        return Derived("bf16" if bf16 else "fp16", "default", "auto: bf16 on GPUs that have it, else fp16")
    if spec.method == "qlora":
        return Derived("bf16", "default", "auto on CPU: qlora computes in bf16")
    return Derived("fp32", "default", "auto on CPU: fp32")


def _quantization(spec: FineTuneSpec, use_gpu: bool, bf16: bool) -> Derived:
    if spec.method != "qlora":
        return Derived(None, "spec", "lora: base weights unquantised")
    q = spec.quantization.model_dump(mode="json")
    if use_gpu and not bf16 and q["compute_dtype"] == "bfloat16" and "compute_dtype" not in spec.quantization.model_fields_set:
        return Derived({**q, "compute_dtype": "float16"}, "default", "this GPU has no bfloat16: NF4 matmuls in float16")
    return Derived(q, "spec")


def _bf16(gpu_type: str | None) -> bool:
    try:
        return get_gpu(gpu_type).bf16 if gpu_type else True
    except PlatformError:  # already reported
        return True


def _pods(workers: int, gpus: float, cpus: float, memory_gb: float) -> dict:
    """Kubernetes pods for the workers: whole-GPU workers get a pod each; fractional ones share one GPU pod."""
    if gpus >= 1 or gpus == 0:
        per_pod, gpus_per_pod = 1, int(gpus)
    else:
        per_pod, gpus_per_pod = max(1, int(1 / gpus)), 1
    return {"pods": math.ceil(workers / per_pod), "workers_per_pod": per_pod, "gpus_per_pod": gpus_per_pod,
            "cpus_per_pod": cpus * per_pod + 1, "memory_gb_per_pod": memory_gb * per_pod}


def resolve_finetune(spec: FineTuneSpec, facts: Facts | None = None) -> Resolved:
    """The resolved plan of a fine-tuning spec on a target (check `.problems`, or call `.require()`)."""
    facts = facts or Facts()
    res, problems = spec.resources, []
    explicit = res.model_fields_set
    gpu_type = facts.gpu_type or res.gpu_type
    v: dict[str, Derived] = {}
    v["gpu_type"] = Derived(gpu_type, "target" if facts.gpu_type else "spec")
    plan, why_no_plan = _plan(spec, gpu_type, problems)

    if res.gpus_per_worker > 0:
        gpus = Derived(float(res.gpus_per_worker), "spec")
    elif plan is not None:
        gpus = Derived(float(plan.placement.gpus_per_worker), "planner", f"gpu_type {plan.gpu}: one GPU per Ray Train worker")
    elif gpu_type and not any(p.location == "resources.gpu_type" for p in problems):
        gpus = Derived(1.0, "default", f"gpu_type set; {why_no_plan}: one GPU per worker")
    else:
        gpus = Derived(0.0, "default", why_no_plan or "CPU training")
    if plan is not None and plan.placement.workers > res.workers:
        workers = Derived(plan.placement.workers, "planner", f"the model needs {plan.placement.workers} x {plan.gpu} (FSDP)")
    else:
        workers = Derived(res.workers, "spec" if "workers" in explicit else "default")
    use_gpu = gpus.value > 0
    bf16 = _bf16(gpu_type)
    v["workers"] = workers
    v["cpus_per_worker"] = Derived(res.cpus_per_worker, "spec" if "cpus_per_worker" in explicit else "default")
    v["gpus_per_worker"] = gpus
    v["use_gpu"] = Derived(use_gpu, gpus.source, "GPUs per worker > 0" if use_gpu else "no GPUs per worker")
    v["backend"] = Derived("nccl" if use_gpu else "gloo", gpus.source, "NCCL between GPU workers, gloo on CPU")
    v["strategy"] = _strategy(spec, plan, workers.value, problems)
    v.update(_objective(spec, problems))
    v["precision"] = _precision(spec, use_gpu, bf16)
    v["quantization"] = _quantization(spec, use_gpu, bf16)
    if plan is not None:
        v["memory_per_worker_gib"] = Derived(round(plan.per_gpu_gib, 2), "planner", f"GPU memory per worker of {plan.usable_gib:.1f} usable on {plan.gpu}")
    else:
        v["memory_per_worker_gib"] = Derived(None, "default", why_no_plan)
    pod_memory = res.memory_gb_per_worker or DEFAULT_POD_MEMORY_GB[use_gpu]
    v["pod_memory_gb_per_worker"] = Derived(pod_memory, "spec" if res.memory_gb_per_worker else "default")
    v["pods"] = Derived(_pods(workers.value, gpus.value, res.cpus_per_worker, pod_memory), gpus.source, "Kubernetes worker pods for these workers")

    has_validation = bool(spec.data.validation) or spec.data.validation_split > 0
    metric, mode = spec.checkpoint.metric, spec.checkpoint.mode
    metric_src = "spec" if "metric" in spec.checkpoint.model_fields_set else "default"
    if metric.startswith("eval_") and not has_validation:
        metric, mode, metric_src = "loss", "min", "default"
    home = facts.platform_home or (K8S_PLATFORM_HOME if facts.target == "k8s" else "$PLATFORM_HOME")
    v["checkpoint_every_n_steps"] = Derived(spec.checkpoint.every_n_steps, "spec" if "every_n_steps" in spec.checkpoint.model_fields_set else "default")
    v["checkpoint_storage"] = Derived(spec.checkpoint.storage_uri or f"{home}/checkpoints", "spec" if spec.checkpoint.storage_uri else "target")
    v["checkpoint_metric"] = Derived([metric, mode], metric_src, "" if metric_src == "spec" else "no validation data: ranked by training loss" if not has_validation else "")
    v["checkpoints_kept"] = Derived(spec.checkpoint.keep_best, "spec" if "keep_best" in spec.checkpoint.model_fields_set else "default")
    v["eval_enabled"] = Derived(has_validation, "spec", "validation file or validation_split > 0" if has_validation else "no validation data")
    v["eval_every_n_steps"] = Derived(spec.eval.every_n_steps if has_validation else None, "spec" if "every_n_steps" in spec.eval.model_fields_set else "default")
    v["registered_model_name"] = Derived(spec.mlflow.registered_model_name, "spec" if spec.mlflow.registered_model_name else "default",
                                         "" if spec.mlflow.registered_model_name else "unset: the adapter is logged, not registered")
    v["experiment"] = Derived(spec.mlflow.experiment, "spec" if "experiment" in spec.mlflow.model_fields_set else "default")
    return Resolved("finetune", spec, v, facts, plan.to_dict() if plan is not None else None, tuple(problems))
