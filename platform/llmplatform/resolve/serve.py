"""Resolve a ServeSpec against what is known about the target (pure: no I/O, no Ray).

Every value a deployment runs with comes from here: the base model (the spec's, or the registry
lineage's), the engine and why, the tensor-parallel degree (`auto`: the planner's for the GPU),
GPUs per shard, the replica's placement-group bundles and strategy, replicas and autoscaling,
the topology, registry references pinned to versions, the max LoRA rank the engine starts with,
the context length, the registry poll interval and the API-key file the ingress reads. Values
the target cannot satisfy (an adapter rank above the engine's limit, a TP group larger than the
cluster, a model that does not fit the GPU) are problems, all listed at once.
"""

from __future__ import annotations

import math

from llmplatform import catalog, planner
from llmplatform.errors import PlatformError, Problem
from llmplatform.gpus import get_gpu
from llmplatform.resolve.document import Derived, Facts, RegistryFact, Resolved
from llmplatform.specs import REGISTRY_URI, ServeSpec

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
DEFAULT_MAX_LORA_RANK = 64
UPSCALE_DELAY_S = 5.0
# autoscaling.target when unset: waiting requests per replica; fraction of the KV cache in use
DEFAULT_TARGETS = {"queue_depth": 2.0, "kv_cache": 0.7}
K8S_GPUS_PER_NODE = 8  # a TP group larger than one node spans pods (PACK)
K8S_API_KEYS_FILE = "/etc/llm-platform/api-keys/keys"  # where the operator mounts the API-key Secret (key `keys`)


def pinned(ref: str, fact: RegistryFact | None) -> str:
    """`models:/NAME@ALIAS` -> `models:/NAME/VERSION` when the registry was asked; else unchanged."""
    m = REGISTRY_URI.match(ref)
    return f"models:/{m.group('name')}/{fact.version}" if m and fact is not None else ref


def _registry_ref(spec: ServeSpec, facts: Facts, problems: list[Problem]) -> Derived:
    ref = spec.model.registry
    if not ref:
        return Derived(None, "spec")
    fact = facts.registry.get(ref)
    if fact is None:
        if ref in facts.registry_errors:
            problems.append(Problem("model.registry", f"cannot look it up: {facts.registry_errors[ref]}", ref))
        return Derived({"ref": ref, "pinned": ref, "version": None}, "spec", "not looked up")
    return Derived({"ref": ref, "pinned": pinned(ref, fact), "version": fact.version}, "registry")


def _base(spec: ServeSpec, facts: Facts, problems: list[Problem]) -> Derived:
    if spec.model.base:
        return Derived(spec.model.base, "spec")
    fact = facts.registry.get(spec.model.registry or "")
    if fact is not None and fact.base_model:
        return Derived(fact.base_model, "registry", f"lineage of {pinned(spec.model.registry, fact)}")
    if fact is not None:
        problems.append(Problem("model.base", f"{spec.model.registry} has no base_model in its lineage", None, "set model.base"))
    elif spec.model.registry not in facts.registry_errors:
        problems.append(Problem("model.base", f"unset, and {spec.model.registry} was not looked up in the registry", None,
                                "set model.base, or resolve with a reachable MLflow registry"))
    return Derived(None, "default", "unknown")


def _engine(spec: ServeSpec, facts: Facts, problems: list[Problem]) -> Derived:
    where = "the platform image" if facts.target == "k8s" else "this environment"
    if spec.engine != "auto":
        if spec.engine == "vllm" and not facts.vllm_available:
            problems.append(Problem("engine", f"vllm is not installed in {where}", "vllm",
                                    "auto or hf; or an environment with vLLM (make test-vllm builds .venv-vllm; the cluster image must include it)"))
        return Derived(spec.engine, "spec")
    if facts.vllm_available:
        return Derived("vllm", "target", f"auto: vLLM is installed in {where}")
    return Derived("hf", "target", f"auto: vLLM is not installed in {where}; transformers engine")


def _gpus_per_shard(spec: ServeSpec, gpu_type: str | None) -> Derived:
    res = spec.resources
    if res.gpus_per_shard > 0:
        return Derived(float(res.gpus_per_shard), "spec")
    if gpu_type:
        return Derived(1.0, "default", f"gpu_type {gpu_type}: one GPU per tensor-parallel shard")
    return Derived(0.0, "default", "no GPU type: CPU shards")


def _serving_plan(spec: ServeSpec, base: str | None, gpu_type: str | None, problems: list[Problem]):
    if not (gpu_type and base):
        return None, "no GPU type" if not gpu_type else "unknown base model"
    try:
        gpu = get_gpu(gpu_type, None)
    except PlatformError as exc:
        problems.append(Problem("resources.gpu_type", str(exc), gpu_type))
        return None, "unknown GPU type"
    try:
        shape = catalog.get_model(base)
    except catalog.UnknownModelError:
        return None, f"{base} is not in the catalog"
    if spec.max_model_len > shape.context:
        problems.append(Problem("max_model_len", f"exceeds {shape.name}'s context of {shape.context} tokens", spec.max_model_len, f"<= {shape.context}"))
        return None, "max_model_len beyond the context"
    dtype = spec.dtype if spec.dtype != "auto" else "auto"
    plan = planner.plan_serving(shape, gpu, dtype=dtype, max_model_len=spec.max_model_len, cpus_per_shard=spec.resources.cpus_per_shard)
    return plan, ""


def _tensor_parallel(spec: ServeSpec, plan, why: str, gpu_type: str | None, problems: list[Problem]) -> Derived:
    if spec.tensor_parallel != "auto":
        tp = int(spec.tensor_parallel)
        if plan is not None and plan.fits and tp < plan.tensor_parallel:
            problems.append(Problem("tensor_parallel", f"{plan.model} needs {plan.tensor_parallel} x {plan.gpu} per replica; {tp} is short of GPU memory "
                                    f"({plan.total_gib:.1f} GiB in all)", tp, f">= {plan.tensor_parallel}, or 'auto'"))
        return Derived(tp, "spec")
    if not gpu_type:
        return Derived(1, "default", "auto without a GPU type: one shard")
    if plan is None:
        problems.append(Problem("tensor_parallel", f"'auto' needs the planner, and it cannot run: {why}", "auto",
                                "a power of two, or a catalog base model and a known resources.gpu_type"))
        return Derived(1, "default", why)
    reason = next((n for n in plan.notes if "tensor_parallel" in n), f"{plan.model} fits one {plan.gpu}")
    return Derived(plan.tensor_parallel, "planner", reason)


def _gpus_per_node(facts: Facts, gpu_type: str | None) -> int | None:
    """Accelerators in one node: the connected cluster's, else the GPU type's usual count."""
    if facts.gpus_per_node is not None or not gpu_type:
        return facts.gpus_per_node
    try:
        return get_gpu(gpu_type).gpus_per_node
    except PlatformError:  # reported by the planner step
        return None


def _placement(spec: ServeSpec, engine: str, tp: int, gpus_per_shard: float, gpus_per_node: int | None) -> dict:
    """One replica's placement group: `tp` bundles of one accelerator (or share) plus CPUs each;
    STRICT_PACK when the group fits a node's accelerators, PACK across nodes otherwise."""
    res = spec.resources
    accel = res.accelerator_resource or ("GPU" if gpus_per_shard > 0 else None)
    per_shard = gpus_per_shard if gpus_per_shard > 0 else 1.0
    if tp == 1 and accel is None:
        return {"bundles": [], "strategy": "STRICT_PACK", "accelerator": None, "replica_resources": {"num_cpus": res.cpus_per_shard}}
    bundle: dict[str, float] = {"CPU": res.cpus_per_shard}
    if accel:
        bundle[accel] = per_shard
    strategy = "STRICT_PACK" if gpus_per_node is None or accel is None or tp * per_shard <= gpus_per_node else "PACK"
    if engine == "vllm":  # vLLM's Ray workers take the accelerators of every bundle, bundle 0 included
        replica: dict = {"num_cpus": res.cpus_per_shard / 2}
    elif accel == "GPU":
        replica = {"num_cpus": res.cpus_per_shard, "num_gpus": per_shard}
    elif accel:
        replica = {"num_cpus": res.cpus_per_shard, "resources": {accel: per_shard}}
    else:
        replica = {"num_cpus": res.cpus_per_shard}
    return {"bundles": [dict(bundle) for _ in range(tp)], "strategy": strategy, "accelerator": accel, "replica_resources": replica}


def _replicas(spec: ServeSpec) -> Derived:
    a = spec.autoscaling
    initial = a.initial_replicas if a.initial_replicas is not None else max(1, a.min_replicas)
    fixed = a.min_replicas == a.max_replicas and a.initial_replicas is None
    target = a.target if a.target is not None else DEFAULT_TARGETS.get(a.metric, a.target_ongoing_requests)
    value = {"min": a.min_replicas, "max": a.max_replicas, "initial": initial, "autoscaling": not fixed,
             "metric": a.metric, "target": target,
             # Ray's default policy reads this one; `ongoing_requests` with `target` set means that target
             "target_ongoing_requests": target if a.metric == "ongoing_requests" else a.target_ongoing_requests,
             "downscale_delay_s": a.downscale_delay_s, "upscale_delay_s": UPSCALE_DELAY_S,
             "downscale_to_zero_delay_s": (a.downscale_delay_s if a.downscale_to_zero_delay_s is None else a.downscale_to_zero_delay_s)
                                          if a.min_replicas == 0 else None,
             "rows_per_replica": spec.limits.max_batch_size}  # what a replica decodes at once (queue_depth shrinks on it)
    return Derived(value, "spec", "fixed replica count" if fixed else f"autoscaled on {a.metric.replace('_', ' ')} (target {target:g} per replica)")


def _topology(spec: ServeSpec, engine: str, replicas: dict) -> Derived:
    if spec.topology != "auto":
        return Derived(spec.topology, "spec")
    single = replicas["min"] == replicas["max"] == 1 and replicas["initial"] == 1
    if engine == "vllm" and single:
        return Derived("colocated", "default", "auto: one vllm replica, nothing to route")
    return Derived("split", "default", "auto: adapter-affinity routing between engine replicas" if engine == "vllm" else "auto: the hf engine runs as its own deployment")


def _adapters(spec: ServeSpec, facts: Facts, problems: list[Problem]) -> tuple[Derived, dict[str, int]]:
    rows, ranks = [], {}
    for i, a in enumerate(spec.model.adapters):
        row = {"name": a.name, "source": a.source, "pinned": a.source, "version": None, "lora_rank": facts.adapter_ranks.get(a.name)}
        if REGISTRY_URI.match(a.source):
            fact = facts.registry.get(a.source)
            if fact is not None:
                row.update(pinned=pinned(a.source, fact), version=fact.version, lora_rank=fact.lora_rank)
            elif a.source in facts.registry_errors:
                problems.append(Problem(f"model.adapters[{i}].source", f"cannot look it up: {facts.registry_errors[a.source]}", a.source))
        if row["lora_rank"]:
            ranks[f"model.adapters[{i}] ({a.name})"] = row["lora_rank"]
        rows.append(row)
    reg = facts.registry.get(spec.model.registry or "")
    if reg is not None and reg.lora_rank:
        ranks[f"model.registry ({pinned(spec.model.registry, reg)})"] = reg.lora_rank
    return Derived(rows, "registry" if any(r["version"] for r in rows) else "spec"), ranks


def _max_lora_rank(spec: ServeSpec, engine: str, enable_lora: bool, ranks: dict[str, int], problems: list[Problem]) -> Derived:
    if engine != "vllm":
        return Derived(None, "default", "the hf engine loads adapters of any rank")
    if not enable_lora:
        return Derived(None, "default", "base model only: LoRA off")
    limit = VLLM_LORA_RANKS[-1]
    if spec.max_lora_rank is not None:
        value, source, reason = spec.max_lora_rank, "spec", ""
        if value not in VLLM_LORA_RANKS:
            problems.append(Problem("max_lora_rank", "vLLM accepts only these ranks", value, ", ".join(map(str, VLLM_LORA_RANKS))))
    else:
        need = max(ranks.values(), default=0)
        value = next((r for r in VLLM_LORA_RANKS if r >= max(need, DEFAULT_MAX_LORA_RANK)), limit)
        source = "registry" if need > DEFAULT_MAX_LORA_RANK else "default"
        reason = f"the largest known adapter rank is {need}" if need else f"vLLM default for adapters named at request time ({DEFAULT_MAX_LORA_RANK})"
    for where, rank in ranks.items():
        if rank > value:
            fix = f"max_lora_rank >= {rank}" if rank <= limit else f"an adapter of rank <= {limit} (vLLM's limit), or engine: hf"
            problems.append(Problem(where, f"LoRA rank {rank} is above the rank the engine starts with ({value})", rank, fix))
    return Derived(value, source, reason)


def _lora_slots(spec: ServeSpec, engine: str, enable_lora: bool) -> Derived:
    """vLLM's adapter slots: `max_loras` (adapters in one batch, on the device) and `max_cpu_loras`
    (adapters kept in host memory, so a re-used one is not read from disk again)."""
    if engine != "vllm":
        return Derived(None, "default", "the hf engine keeps max_loaded_adapters adapters itself")
    if not enable_lora:
        return Derived(None, "default", "base model only: LoRA off")
    slots = {"max_loras": max(1, min(spec.max_loaded_adapters, spec.limits.max_batch_size)), "max_cpu_loras": spec.max_loaded_adapters * 2}
    return Derived(slots, "spec", "max_loaded_adapters in a batch (at most limits.max_batch_size), twice as many in host memory")


def _api_keys_file(spec: ServeSpec, facts: Facts) -> Derived:
    """The API-key file the ingress reads: the target's (on Kubernetes the mounted Secret), else the spec's."""
    auth = spec.auth
    if not auth.enabled:
        return Derived(None, "default", "auth off")
    target_file = facts.api_keys_file or (K8S_API_KEYS_FILE if facts.target == "k8s" else None)
    if target_file:
        why = "the operator mounts the API-key Secret here" if facts.target == "k8s" else "the target's keys file"
        if auth.api_keys_file and auth.api_keys_file != target_file:
            why += f"; auth.api_keys_file {auth.api_keys_file} is not in the pods"
        return Derived(target_file, "target", why)
    if auth.api_keys_file:
        return Derived(auth.api_keys_file, "spec")
    return Derived(None, "default", f"keys from ${auth.api_keys_env} only" if auth.api_keys_env else "no keys file and no keys env: every request is refused")


SERVE_POD_MEMORY_GB = {"per_gpu": 24.0, "cpu": 8.0}  # host RAM per GPU of a serving pod (weights staged, KV swap), or per CPU pod


def _serve_pods(spec: ServeSpec, tp: int, gpus_per_shard: float, gpus_per_node: int | None) -> dict:
    """Kubernetes worker pods of one replica: its tp shards' GPUs spread over as few nodes as they fit."""
    gpus_per_replica = math.ceil(tp * gpus_per_shard)
    if gpus_per_replica:
        pods_per_replica = math.ceil(gpus_per_replica / (gpus_per_node or K8S_GPUS_PER_NODE))
        gpus_per_pod = math.ceil(gpus_per_replica / pods_per_replica)
    else:
        pods_per_replica, gpus_per_pod = 1, 0
    shards_per_pod = math.ceil(tp / pods_per_replica)
    memory = SERVE_POD_MEMORY_GB["per_gpu"] * gpus_per_pod if gpus_per_pod else SERVE_POD_MEMORY_GB["cpu"]
    return {"pods_per_replica": pods_per_replica, "gpus_per_pod": gpus_per_pod, "shards_per_pod": shards_per_pod,
            "cpus_per_pod": math.ceil(shards_per_pod * spec.resources.cpus_per_shard) + 1, "memory_gb_per_pod": memory}


def resolve_serve(spec: ServeSpec, facts: Facts | None = None) -> Resolved:
    """The resolved plan of a serving spec on a target (check `.problems`, or call `.require()`)."""
    facts = facts or Facts()
    problems: list[Problem] = []
    v: dict[str, Derived] = {}
    gpu_type = facts.gpu_type or spec.resources.gpu_type
    v["registry"] = _registry_ref(spec, facts, problems)
    v["base_model"] = _base(spec, facts, problems)
    v["engine"] = engine = _engine(spec, facts, problems)
    v["gpu_type"] = Derived(gpu_type, "target" if facts.gpu_type else "spec")
    plan, why = _serving_plan(spec, v["base_model"].value, gpu_type, problems)
    if plan is not None and not plan.fits:
        problems.append(Problem("resources.gpu_type", "; ".join(n for n in plan.notes if "does not fit" in n), gpu_type, "a larger GPU or a shorter max_model_len"))
    v["tensor_parallel"] = tp = _tensor_parallel(spec, plan, why, gpu_type, problems)
    v["gpus_per_shard"] = gps = _gpus_per_shard(spec, gpu_type)
    per_node = _gpus_per_node(facts, gpu_type)
    if per_node is None and facts.target == "k8s":
        v["gpus_per_node"] = Derived(K8S_GPUS_PER_NODE, "default", "no GPU type: the usual 8 GPUs in one node")
    else:
        v["gpus_per_node"] = Derived(per_node, "target" if facts.gpus_per_node is not None else "default",
                                     "the connected cluster's largest node" if facts.gpus_per_node is not None else "the GPU type's usual node" if per_node else "unknown")
    placement = _placement(spec, engine.value, tp.value, gps.value, v["gpus_per_node"].value)
    v["placement"] = Derived(placement, tp.source if placement["bundles"] else "default",
                             f"{len(placement['bundles'])} bundle(s), {placement['strategy']}" if placement["bundles"] else "one CPU replica: no placement group")
    v["replicas"] = replicas = _replicas(spec)
    need = tp.value * (gps.value if gps.value > 0 else (1.0 if placement["accelerator"] else 0.0))
    if facts.accelerators is not None and need and need * max(1, replicas.value["min"]) > facts.accelerators:
        problems.append(Problem("tensor_parallel", f"{max(1, replicas.value['min'])} replica(s) x {tp.value} shard(s) need {need * max(1, replicas.value['min']):g} "
                                f"{placement['accelerator']}, the cluster has {facts.accelerators:g}", tp.value, "a smaller tensor_parallel or fewer replicas"))
    v["pods"] = Derived(_serve_pods(spec, tp.value, gps.value, v["gpus_per_node"].value), tp.source,
                        "Kubernetes worker pods per replica: the replica's GPUs on as few nodes as hold them, one CPU more than its shards")
    v["topology"] = _topology(spec, engine.value, replicas.value)
    v["adapters"], ranks = _adapters(spec, facts, problems)
    enable_lora = bool(spec.model.adapters or spec.model.registry or spec.model.allow_dynamic_adapters)
    v["enable_lora"] = Derived(enable_lora, "spec", "adapters listed, a registry reference, or dynamic adapters allowed" if enable_lora else "base model only")
    v["max_lora_rank"] = _max_lora_rank(spec, engine.value, enable_lora, ranks, problems)
    v["lora_slots"] = _lora_slots(spec, engine.value, enable_lora)
    v["dtype"] = Derived(spec.dtype if spec.dtype != "auto" else (plan.dtype if plan else "auto"), "spec" if spec.dtype != "auto" else ("planner" if plan else "default"))
    v["max_model_len"] = Derived(spec.max_model_len, "spec" if "max_model_len" in spec.model_fields_set else "default")
    v["alias_following"] = Derived("operator" if facts.target == "k8s" else "app", "target",
                                   "the operator re-resolves aliases and updates the pinned versions in place" if facts.target == "k8s"
                                   else "the application re-resolves aliases every registry_poll_s")
    if facts.registry_poll_s is not None:
        v["registry_poll_s"] = Derived(facts.registry_poll_s, "target", "the operator's LLMOP_REGISTRY_POLL_S overrides the spec")
    else:
        v["registry_poll_s"] = Derived(spec.registry_poll_s, "spec" if "registry_poll_s" in spec.model_fields_set else "default")
    v["api_keys_file"] = _api_keys_file(spec, facts)
    return Resolved("serve", spec, v, facts, plan.to_dict() if plan is not None else None, tuple(problems))


def served_spec(plan: Resolved) -> ServeSpec:
    """The spec as the replicas serve it: where the operator follows aliases, every registry
    reference is pinned to the version it resolved (it updates them in place when an alias moves)."""
    spec: ServeSpec = plan.spec  # type: ignore[assignment]
    if plan["alias_following"] != "operator":
        return spec
    pins = {row["source"]: row["pinned"] for row in plan["adapters"]}
    adapters = [a.model_copy(update={"source": pins.get(a.source, a.source)}) for a in spec.model.adapters]
    registry = (plan["registry"] or {}).get("pinned", spec.model.registry)
    return spec.model_copy(update={"model": spec.model.model_copy(update={"adapters": adapters, "registry": registry})})
