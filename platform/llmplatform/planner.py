"""GPU memory and placement planning: model x method x GPU -> memory breakdown, workers, TP, bundles.

Pure functions over `catalog.ModelShape` and `gpus.GPU`; no I/O. All sizes are GiB (2**30
bytes), the unit CUDA and `nvidia-smi` report. The estimates are the standard accounting:

- weights: 16-bit = 2 bytes/param; QLoRA keeps the linear layers in NF4 with double
  quantisation (4 bits + 8-bit absmax per 64 weights + fp32 constant per 256 blocks = 4.127
  bits/param, QLoRA paper section 3). Serving keeps embeddings, lm_head and norms in 16-bit;
  QLoRA training holds them in fp32 (peft's `prepare_model_for_kbit_training` upcasts them).
- LoRA adapters (peft defaults): A (r x in) + B (out x r) per targeted linear layer, fp32 weights,
  fp32 gradients, AdamW m and v in fp32: 16 bytes per trainable parameter.
- full fine-tuning, mixed-precision AdamW (ZeRO paper accounting): 16-bit weights and gradients
  (2 + 2 bytes) and fp32 master weights, m and v (12 bytes) = 16 bytes per parameter.
- activations: see `activation_bytes`. KV cache: 2 (K and V) * layers * kv_heads * head_dim *
  bytes per token. Framework overhead: CUDA context, cuBLAS/NCCL workspaces, allocator slack.

Placement: training takes the smallest power-of-two number of 1-GPU workers whose FSDP-sharded
share fits (1 = no FSDP); serving takes the smallest power-of-two tensor-parallel degree whose
per-GPU weights, one full-context sequence of KV cache and runtime fit in vLLM's default 90% of
memory. A group that fits one node gets STRICT_PACK, a larger one PACK.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

from llmplatform.catalog import ModelShape, get_model
from llmplatform.errors import PlatformError
from llmplatform.gpus import GPU, get_gpu

GIB = 2**30
METHODS = ("lora", "qlora", "full")
SERVE_DTYPES = ("auto", "bfloat16", "float16", "float32", "int8", "nf4")
KV_CACHE_DTYPES = ("auto", "fp8")
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127: double-quantised NF4, blocks of 64 and 256
WEIGHT_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "int8": 1.0, "nf4": NF4_BITS / 8}
LORA_STATE_BYTES = {"adapter": 4, "gradients": 4, "optimizer": 8}  # fp32 weights, grads, AdamW m+v
FULL_STATE_BYTES = {"weights": 2, "gradients": 2, "optimizer": 12}  # bf16 w/g; fp32 master, m, v
FRAMEWORK_OVERHEAD_GIB = 1.0  # CUDA context + cuBLAS/NCCL workspaces + allocator slack, per GPU
TRAIN_MEMORY_FRACTION = 0.95  # leave 5% for fragmentation peaks
SERVE_MEMORY_FRACTION = 0.90  # vLLM's default gpu_memory_utilization
MAX_GPUS = 1024


class PlanError(PlatformError):
    """A planner input is out of range (method, dtype, length); the message names the fix."""


@dataclass(frozen=True)
class Placement:
    """Where the work runs: Ray workers, one GPU each, in one placement group."""

    workers: int
    gpus_per_worker: int
    tensor_parallel: int
    nodes: int
    fsdp: bool
    bundles: list[dict[str, float]]
    strategy: Literal["STRICT_PACK", "PACK"]


@dataclass(frozen=True)
class KVCache:
    """KV cache size of a model at a dtype; `mha_per_token_bytes` is what full MHA would need."""

    per_token_bytes: int
    mha_per_token_bytes: int
    tokens: int  # the context these totals are for
    full_context_gib: float

    @property
    def gqa_reduction(self) -> float:
        return self.mha_per_token_bytes / self.per_token_bytes


@dataclass(frozen=True)
class TrainingPlan:
    """Memory (GiB, one unsharded copy) and placement for a fine-tuning job."""

    model: str
    params_b: float
    method: str
    gpu: str
    gpu_memory_gib: float
    seq_len: int
    micro_batch: int
    lora_rank: int | None
    gradient_checkpointing: bool
    trainable_params: int
    memory_gib: dict[str, float]  # weights, adapter, gradients, optimizer, activations, overhead, total
    per_gpu_gib: float  # what one worker holds after FSDP sharding
    usable_gib: float
    fits: bool
    kv_cache: KVCache
    placement: Placement
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.memory_gib["total"]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "training", **_rounded(asdict(self)), "kv_cache": _kv_dict(self.kv_cache)}


@dataclass(frozen=True)
class ServingPlan:
    """Memory (GiB) and tensor-parallel placement for one serving replica."""

    model: str
    params_b: float
    gpu: str
    gpu_memory_gib: float
    dtype: str
    kv_cache_dtype: str
    max_model_len: int
    memory_gib: dict[str, float]  # weights, kv_cache (one full-length sequence), overhead, total
    per_gpu_gib: float
    usable_gib: float
    fits: bool
    kv_cache: KVCache
    kv_capacity_tokens: int  # KV cache room across the replica at this TP degree
    max_full_length_sequences: int  # concurrent sequences of max_model_len tokens
    placement: Placement
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.memory_gib["total"]

    @property
    def tensor_parallel(self) -> int:
        return self.placement.tensor_parallel

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "serving", **_rounded(asdict(self)), "kv_cache": _kv_dict(self.kv_cache)}


# ---------------------------------------------------------------------------- building blocks


def kv_cache(model: ModelShape | str, tokens: int | None = None, bytes_per_value: float = 2.0) -> KVCache:
    """KV cache: per token 2 * layers * kv_heads * head_dim * bytes; `tokens` defaults to the context."""
    m = get_model(model)
    tokens = m.context if tokens is None else tokens
    per_token = int(2 * m.layers * m.kv_heads * m.head_dim * bytes_per_value)
    mha = int(2 * m.layers * m.heads * m.head_dim * bytes_per_value)
    return KVCache(per_token, mha, tokens, per_token * tokens / GIB)


def lora_params(model: ModelShape | str, rank: int, targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> int:
    """Trainable LoRA parameters: rank * (in + out) per targeted linear layer, over all layers."""
    m = get_model(model)
    dims = {  # (in_features, out_features) of each Llama linear layer
        "q_proj": (m.hidden, m.hidden), "k_proj": (m.hidden, m.kv_dim), "v_proj": (m.hidden, m.kv_dim),
        "o_proj": (m.hidden, m.hidden), "gate_proj": (m.hidden, m.ffn), "up_proj": (m.hidden, m.ffn),
        "down_proj": (m.ffn, m.hidden),
    }
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise PlanError(f"unknown LoRA target module(s) {unknown}; accepted: {', '.join(dims)}")
    return m.layers * sum(rank * sum(dims[t]) for t in targets)


def weight_bytes(model: ModelShape | str, dtype: str) -> float:
    """Bytes of the weights at `dtype`; quantised dtypes keep embeddings, lm_head and norms 16-bit."""
    m = get_model(model)
    if dtype not in WEIGHT_BYTES:
        raise PlanError(f"unknown weight dtype {dtype!r}; accepted: {', '.join(WEIGHT_BYTES)}")
    if WEIGHT_BYTES[dtype] >= 2:
        return m.params * WEIGHT_BYTES[dtype]
    linear = m.layers * m.layer_linear_params
    return linear * WEIGHT_BYTES[dtype] + (m.params - linear) * 2.0


def qlora_weight_bytes(model: ModelShape | str) -> float:
    """QLoRA training's frozen base: NF4 linear layers, and embeddings, lm_head and norms in fp32
    (peft's `prepare_model_for_kbit_training` upcasts every non-quantised parameter)."""
    m = get_model(model)
    linear = m.layers * m.layer_linear_params
    return linear * WEIGHT_BYTES["nf4"] + (m.params - linear) * 4.0


def activation_bytes(model: ModelShape | str, seq_len: int, micro_batch: int, checkpointing: bool = True, lora: bool = True) -> float:
    """Training activations held for backward (16-bit, SDPA/flash attention: no seq^2 term).

    Per token and layer a Llama decoder layer saves 9h + 3*kv_dim + 4*ffn values: two RMSNorm
    inputs (fp32, 2h each), the normalised inputs of attention and MLP (h each), q and k before
    RoPE and q, k, v, output for attention (3h + 3*kv_dim), and gate, up, SiLU(gate) and their
    product (4*ffn). LoRA with dropout adds the dropped-out inputs of its seven modules (6h + ffn);
    with dropout 0 peft passes the layer input itself and saves nothing more.
    With gradient checkpointing only each layer's input (h) is kept, plus one layer recomputed
    at a time. The loss adds b*s*vocab*10 bytes (bf16 logits, fp32 copy, fp32 log-softmax).
    """
    m = get_model(model)
    tokens = seq_len * micro_batch
    per_layer = 9 * m.hidden + 3 * m.kv_dim + 4 * m.ffn + ((6 * m.hidden + m.ffn) if lora else 0)
    if checkpointing:
        layers = m.layers * m.hidden + per_layer  # saved layer inputs + the layer being recomputed
    else:
        layers = m.layers * per_layer
    return tokens * (2 * layers + 10 * m.vocab)


def _placement(gpus: int, gpu: GPU, cpus_per_gpu: float, tp: int, fsdp: bool) -> Placement:
    bundles = [{"GPU": 1, "CPU": cpus_per_gpu} for _ in range(gpus)]
    strategy = "STRICT_PACK" if gpus <= gpu.gpus_per_node else "PACK"
    return Placement(gpus, 1, tp, math.ceil(gpus / gpu.gpus_per_node), fsdp, bundles, strategy)


def _powers_of_two(limit: int) -> Iterable[int]:
    n = 1
    while n <= limit:
        yield n
        n *= 2


# ---------------------------------------------------------------------------- training


def plan_training(
    model: ModelShape | str,
    method: str,
    gpu: GPU | str,
    seq_len: int | None = None,
    micro_batch: int = 1,
    lora_rank: int = 16,
    gradient_checkpointing: bool = True,
    lora_targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    adapter_dtype: Literal["float32", "bfloat16"] = "float32",
    cpus_per_worker: float = 4.0,
    lora_dropout: float = 0.05,
) -> TrainingPlan:
    """Memory breakdown and the smallest GPU placement for LoRA, QLoRA or full fine-tuning.

    `seq_len` defaults to 2048 (the FineTuneSpec default) or the model's context if shorter.
    `adapter_dtype="bfloat16"` models the QLoRA paper's recipe (adapters in bf16, AdamW in fp32).
    """
    m, g = get_model(model), get_gpu(gpu)
    seq_len = min(2048, m.context) if seq_len is None else seq_len
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    if seq_len < 1 or micro_batch < 1 or lora_rank < 1:
        raise PlanError(f"seq_len, micro_batch and lora_rank must be >= 1 (given: {seq_len}, {micro_batch}, {lora_rank})")
    if seq_len > m.context:
        raise PlanError(f"seq_len {seq_len} exceeds {m.name}'s context of {m.context} tokens; use --seq-len <= {m.context}")
    notes: list[str] = []
    if method == "full":
        trainable = m.params
        b = FULL_STATE_BYTES
        memory = {"weights": m.params * b["weights"], "adapter": 0.0, "gradients": m.params * b["gradients"], "optimizer": m.params * b["optimizer"]}
        notes.append("full: bf16 weights and gradients, fp32 master weights + AdamW m, v (16 bytes/param)")
    else:
        trainable = lora_params(m, lora_rank, lora_targets)
        adapter_bytes = 2 if adapter_dtype == "bfloat16" else LORA_STATE_BYTES["adapter"]
        memory = {
            "weights": qlora_weight_bytes(m) if method == "qlora" else weight_bytes(m, "bfloat16"),
            "adapter": trainable * adapter_bytes,
            "gradients": trainable * adapter_bytes,
            "optimizer": trainable * LORA_STATE_BYTES["optimizer"],
        }
        share = 100 * trainable / m.params
        notes.append(f"LoRA r={lora_rank} on {', '.join(lora_targets)}: {trainable / 1e6:.1f}M trainable params ({share:.2f}%)")
        if method == "qlora":
            notes.append(f"QLoRA: linear weights NF4 + double quant ({NF4_BITS:.3f} bits/param); embeddings, lm_head, norms fp32 (upcast for training)")
    memory["activations"] = activation_bytes(m, seq_len, micro_batch, gradient_checkpointing, lora=method != "full" and lora_dropout > 0)
    memory = {k: v / GIB for k, v in memory.items()}
    memory["overhead"] = FRAMEWORK_OVERHEAD_GIB
    memory["total"] = sum(memory.values())
    if not g.bf16:
        notes.append(f"{g.name} has no bfloat16: train in float16 with loss scaling (same memory)")

    usable = g.memory_gib * TRAIN_MEMORY_FRACTION
    shardable = memory["weights"] + memory["adapter"] + memory["gradients"] + memory["optimizer"]
    fixed = memory["activations"] + memory["overhead"]
    unit = (memory["weights"] + memory["adapter"]) / m.layers  # one FSDP unit (decoder layer), gathered
    workers, per_gpu = MAX_GPUS, shardable / MAX_GPUS + fixed + 2 * unit
    for n in _powers_of_two(MAX_GPUS):
        need = shardable / n + fixed + (2 * unit if n > 1 else 0.0)  # all-gather + prefetch buffers
        if need <= usable:
            workers, per_gpu = n, need
            break
    fits = per_gpu <= usable
    if not fits:
        notes.append(f"does not fit even sharded over {MAX_GPUS} GPUs: activations + overhead alone need {fixed:.1f} GiB; lower --seq-len/--micro-batch")
    elif workers > 1:
        notes.append(f"needs FSDP over {workers} GPUs ({memory['total']:.1f} GiB does not fit one {g.name})")
    kv = kv_cache(m, m.context)
    notes.append("KV cache is not used in training; shown for reference")
    return TrainingPlan(
        m.name, m.params_b, method, g.name, g.memory_gib, seq_len, micro_batch,
        None if method == "full" else lora_rank, gradient_checkpointing, trainable,
        memory, per_gpu, usable, fits, kv, _placement(workers, g, cpus_per_worker, 1, workers > 1), notes,
    )


# ---------------------------------------------------------------------------- serving


def _resolve_dtype(dtype: str, g: GPU) -> str:
    if dtype not in SERVE_DTYPES:
        raise PlanError(f"unknown dtype {dtype!r}; accepted: {', '.join(SERVE_DTYPES)}")
    if dtype == "auto":
        return "bfloat16" if g.bf16 else "float16"
    return dtype


def _tp_allowed(m: ModelShape, tp: int) -> bool:
    """vLLM's rule: query heads split evenly; KV heads split evenly or are replicated."""
    return m.heads % tp == 0 and (m.kv_heads % tp == 0 or tp % m.kv_heads == 0)


def plan_serving(
    model: ModelShape | str,
    gpu: GPU | str,
    dtype: str = "auto",
    max_model_len: int | None = None,
    kv_cache_dtype: str = "auto",
    prefill_tokens: int = 4096,
    cpus_per_shard: float = 1.0,
) -> ServingPlan:
    """Memory and the smallest tensor-parallel degree for one serving replica.

    A degree fits when weights/tp + one max_model_len sequence of KV cache/tp + runtime overhead
    is within 90% of the GPU. Runtime overhead = framework overhead + the activations of a
    `prefill_tokens` forward chunk (tokens * (4h + 2*ffn) values, split over tp).
    """
    m, g = get_model(model), get_gpu(gpu)
    dtype = _resolve_dtype(dtype, g)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise PlanError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; accepted: {', '.join(KV_CACHE_DTYPES)}")
    max_len = m.context if max_model_len is None else max_model_len
    if not 1 <= max_len <= m.context:
        raise PlanError(f"max_model_len {max_len} is outside 1..{m.context} ({m.name}'s context); use --max-model-len <= {m.context}")
    notes: list[str] = []
    if dtype == "bfloat16" and not g.bf16:
        notes.append(f"{g.name} has no bfloat16 and vLLM refuses it there: use --dtype float16 (same memory)")
    act_bytes = 4.0 if dtype == "float32" else 2.0
    kv_bytes = 1.0 if kv_cache_dtype == "fp8" else act_bytes
    kv = kv_cache(m, max_len, kv_bytes)
    weights = weight_bytes(m, dtype) / GIB
    activations = min(prefill_tokens, max_len) * (4 * m.hidden + 2 * m.ffn) * act_bytes / GIB
    usable = g.memory_gib * SERVE_MEMORY_FRACTION

    def per_gpu(tp: int) -> float:
        return (weights + kv.full_context_gib + activations) / tp + FRAMEWORK_OVERHEAD_GIB

    candidates = [tp for tp in _powers_of_two(min(m.heads, 64)) if _tp_allowed(m, tp)]
    tp = next((t for t in candidates if per_gpu(t) <= usable), candidates[-1])
    fits = per_gpu(tp) <= usable
    room = (usable - FRAMEWORK_OVERHEAD_GIB) * tp - weights - activations  # GiB left for KV cache
    capacity = max(0, int(room * GIB / kv.per_token_bytes))
    if not fits:
        notes.append(f"does not fit: {per_gpu(tp):.1f} GiB per GPU at the largest tensor-parallel degree {tp} (> {usable:.1f} usable); use a larger GPU, --dtype int8/nf4 or a shorter --max-model-len")
    elif tp > 1:
        notes.append(f"weights alone are {weights:.1f} GiB: sharded over tensor_parallel={tp}")
    if m.kv_heads < m.heads:
        notes.append(f"GQA: {m.kv_heads} KV heads for {m.heads} query heads, KV cache {kv.gqa_reduction:g}x smaller than MHA")
    memory = {"weights": weights, "kv_cache": kv.full_context_gib, "activations": activations, "overhead": FRAMEWORK_OVERHEAD_GIB * tp}
    memory["total"] = sum(memory.values())
    return ServingPlan(
        m.name, m.params_b, g.name, g.memory_gib, dtype, kv_cache_dtype, max_len, memory, per_gpu(tp), usable,
        fits, kv, capacity, capacity // max_len, _placement(tp, g, cpus_per_shard, tp, False), notes,
    )


# ---------------------------------------------------------------------------- tables


def sizing_table(models: Iterable[ModelShape | str], gpu: GPU | str) -> list[dict[str, Any]]:
    """One row per model: GiB and GPUs for QLoRA, LoRA, full fine-tuning and bf16/fp16 serving."""
    rows = []
    for model in models:
        m = get_model(model)
        row: dict[str, Any] = {"model": m.name, "params_b": round(m.params / 1e9, 2), "gpu": get_gpu(gpu).name}
        for method in ("qlora", "lora", "full"):
            p = plan_training(m, method, gpu)
            row[f"{method}_gib"] = round(p.total_gib, 1)
            row[f"{method}_gpus"] = p.placement.workers if p.fits else None
        s = plan_serving(m, gpu)
        row["serve_gib"] = round(s.total_gib, 1)
        row["serve_tp"] = s.tensor_parallel if s.fits else None
        rows.append(row)
    return rows


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _kv_dict(kv: KVCache) -> dict[str, Any]:
    return _rounded({**asdict(kv), "per_token_mib": kv.per_token_bytes / 2**20, "gqa_reduction": kv.gqa_reduction})
