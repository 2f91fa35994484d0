"""Job and deployment specs: the single source of truth.

`FineTuneSpec` (a LoRA/QLoRA fine-tuning job) and `ServeSpec` (a serving deployment) are
pydantic v2 models with `extra="forbid"` and a description on every field. The CLI, the YAML
files in `jobs/`, the Ray job entrypoint, the CRD schemas in `manifests/` and the operator all
use these models, so they cannot drift. `load_spec` reads YAML/JSON and reports every problem at
once, each with its field path, what was given and what is accepted.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmplatform.errors import Problem, SpecError

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # a Secret / PVC name
REGISTRY_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9][\w.\-]*)(?:@(?P<alias>[\w\-]+)|/(?P<version>\d+))$")
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StrictModel(BaseModel):
    """Base for every spec section: unknown fields are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


# ---------------------------------------------------------------------------- fine-tuning


class DataSpec(StrictModel):
    """Where the training data is and how it becomes token sequences."""

    train: str = Field(description="Training data: a local path or object-store URI (s3://, gs://) to a JSONL, JSON or Parquet file, or a Hugging Face dataset `hf://datasets/OWNER/NAME?split=train&revision=REV` (loaded through `datasets`, honouring its cache and offline mode).")
    validation: str | None = Field(default=None, description="Validation data in the same shapes as `train`. If omitted, `validation_split` of the training data is held out.")
    validation_split: float = Field(default=0.05, ge=0.0, lt=0.5, description="Share of training records held out for evaluation when `validation` is not given (0 disables evaluation).")
    format: Literal["auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text"] = Field(default="auto", description="Record shape: `chat` (messages, optional per-message `weight` 0/1), `sharegpt` (conversations of from/value), `prompt_completion`, `alpaca` (instruction/input/output), `text` (continued pretraining), or `auto` to detect per record.")
    max_seq_length: int = Field(default=2048, ge=16, le=32768, description="Tokens per training sequence (Llama 2's context is 4096).")
    packing: bool = Field(default=False, description="Pack several examples into one sequence; attention and position ids are reset at example boundaries so examples never see each other.")
    truncation: Literal["right", "drop"] = Field(default="right", description="Examples longer than `max_seq_length`: `right` cuts the end (keeping the prompt), `drop` skips the example.")
    system_prompt: str | None = Field(default=None, description="System prompt added to examples that have none, as their first message (the base's chat template renders it; Llama 2's as a `<<SYS>>` block in the first turn).")


class LoraSpec(StrictModel):
    """LoRA adapter shape (peft)."""

    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r (adapter matrices are d x r and r x k).")
    alpha: float = Field(default=32.0, gt=0, description="LoRA scaling alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR_MODULES), min_length=1, description="Linear layers that get adapters. Llama names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full and saved with the adapter (e.g. `lm_head`, `embed_tokens`).")

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in LLAMA_LINEAR_MODULES and m not in ("all-linear",)]
        if unknown:
            raise ValueError(f"unknown Llama module(s) {unknown}; accepted: {LLAMA_LINEAR_MODULES} or 'all-linear'")
        return value


class QuantizationSpec(StrictModel):
    """4-bit base-model quantisation for QLoRA (bitsandbytes)."""

    bits: Literal[4] = Field(default=4, description="Bits per base weight. QLoRA uses 4.")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type; NF4 is QLoRA's normal-float.")
    double_quant: bool = Field(default=True, description="Quantise the quantisation constants too (saves ~0.37 bits/param).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(default="bfloat16", description="Dtype of the matmuls after dequantisation.")


class HyperParameters(StrictModel):
    """Optimiser and schedule. Defaults follow the Llama 2 recipe (AdamW 0.9/0.95, wd 0.1, cosine)."""

    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate (LoRA usually 1e-4..3e-4; Llama 2 SFT full tuning used 2e-5).")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data (ignored when `max_steps` is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(default=4, ge=1, description="Sequences per worker per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step. Global batch = micro_batch_size x accumulation x workers.")
    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"] = Field(default="adamw", description="Optimizer; paged variants (bitsandbytes) are QLoRA's default on GPU.")
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="AdamW beta1 (Llama 2: 0.9).")
    adam_beta2: float = Field(default=0.95, ge=0.0, lt=1.0, description="AdamW beta2 (Llama 2: 0.95).")
    adam_epsilon: float = Field(default=1e-5, gt=0, description="AdamW epsilon (Llama 2: 1e-5).")
    weight_decay: float = Field(default=0.1, ge=0.0, description="Decoupled weight decay (Llama 2: 0.1).")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Learning-rate schedule after warmup (Llama 2: cosine).")
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0, description="Share of steps spent in linear warmup.")
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Cosine decays to this share of the peak (Llama 2: 10%).")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm (Llama 2: 1.0).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward to save memory.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(default="auto", description="Autocast dtype: `auto` is bf16 on GPU, fp32 on CPU (bf16 for QLoRA on CPU).")
    seed: int = Field(default=42, ge=0, description="Seed for data order, init and dropout; the same seed gives the same run.")


# TRL 1.16 DPOTrainer loss names that need no parameter besides beta (see training.dpo)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sigmoid_norm", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down")


class DpoSpec(StrictModel):
    """Direct Preference Optimization settings (used when `objective` is `dpo`); names follow TRL's DPOConfig."""

    beta: float = Field(default=0.1, gt=0, le=100, description="DPO beta: how far the policy may move from the reference (the frozen base); for `ipo` the regularisation tau. TRL's default 0.1.")
    loss_type: str = Field(default="sigmoid", description="Preference loss, by TRL's name: `sigmoid` (DPO), `hinge` (SLiC), `ipo`, `sigmoid_norm`, `nca_pair`, `bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`.")

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in DPO_LOSS_TYPES:
            close = difflib.get_close_matches(value, DPO_LOSS_TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown DPO loss type {value!r}{hint}; accepted: {', '.join(DPO_LOSS_TYPES)}")
        return value


class Toleration(StrictModel):
    """A Kubernetes toleration for the worker pods."""

    key: str = Field(description="Taint key to tolerate, e.g. `nvidia.com/gpu`.")
    operator: Literal["Exists", "Equal"] = Field(default="Exists", description="`Exists` matches any value; `Equal` needs `value`.")
    value: str | None = Field(default=None, description="Taint value (with operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(default=None, description="Taint effect to tolerate; empty matches all.")


class ClusterSpec(StrictModel):
    """Kubernetes objects the operator gives this workload's Ray pods, overriding its own settings; used only by the operator (`--target k8s`): local and Ray-address targets ignore this section."""

    hf_token_secret: str | None = Field(default=None, description="Secret whose key `token` becomes `HF_TOKEN` in every Ray container (gated Hugging Face models such as Llama 2). Unset: the operator's `LLMOP_HF_TOKEN_SECRET` (default `llm-platform-hf-token`). The reference is optional: without the Secret, public models still load. Kubernetes only.")
    model_cache_pvc: str | None = Field(default=None, description="PersistentVolumeClaim mounted at `/models` in every Ray pod, with `HF_HOME=/models/huggingface`, so downloaded weights survive pods. Use a ReadWriteMany claim: every pod of the cluster mounts it, on any node. Unset: the operator's `LLMOP_MODEL_CACHE_PVC` (default: none, each pod downloads into its own disk). Kubernetes only.")
    api_keys_secret: str | None = Field(default=None, description="Secret whose key `keys` (the keys file: one `sha256:<hex>` hash or plain key per line, optionally followed by `name=`, `rpm=`, `tpm=`) is mounted at `/etc/llm-platform/api-keys/keys` and read as the API-key file when `auth.enabled` (serving only). Unset: the operator's `LLMOP_API_KEYS_SECRET` (default `llm-platform-api-keys`). Kubernetes only.")

    @field_validator("hf_token_secret", "model_cache_pvc", "api_keys_secret")
    @classmethod
    def _object_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not DNS_SUBDOMAIN.match(value)):
            raise ValueError("must be a Kubernetes object name (DNS-1123): lowercase letters, digits, '-' and '.', "
                             "starting and ending with a letter or digit, at most 253 characters, e.g. llm-platform-hf-token")
        return value


class ResourcesSpec(StrictModel):
    """How many Ray Train workers, and what each one gets."""

    workers: int = Field(default=1, ge=1, le=512, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per worker (0 = CPU training, gloo backend).")
    memory_gb_per_worker: float | None = Field(default=None, gt=0, description="Memory per worker (Kubernetes request); unset = planner default.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(default="auto", description="`ddp` replicates the model per worker; `fsdp` shards it; `auto` picks FSDP when the planner says one device can't hold it.")
    max_failures: int = Field(default=0, ge=0, le=100, description="Worker-group restarts allowed; a restart resumes from the last checkpoint.")
    gpu_type: str | None = Field(default=None, description="GPU model for the planner and node selection, e.g. `a100-80gb`, `h100-80gb`.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes node selector for worker pods.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Kubernetes tolerations for worker pods.")


class CheckpointSpec(StrictModel):
    """Ray Train checkpoints: adapter, optimizer, scheduler and data position."""

    every_n_steps: int = Field(default=50, ge=1, description="Checkpoint cadence in optimizer steps.")
    storage_uri: str | None = Field(default=None, description="Where checkpoints go: a local path or s3:// / gs:// URI. Default: `<PLATFORM_HOME>/checkpoints`.")
    keep_best: int = Field(default=2, ge=1, description="Checkpoints kept, best first by `metric`.")
    metric: str = Field(default="eval_loss", description="Metric that ranks checkpoints.")
    mode: Literal["min", "max"] = Field(default="min", description="Whether a lower or higher `metric` is better.")


class EvalSpec(StrictModel):
    """Evaluation on the validation set: loss, perplexity, token accuracy."""

    every_n_steps: int = Field(default=50, ge=1, description="Evaluation cadence in optimizer steps (also at the end).")
    max_batches: int | None = Field(default=None, ge=1, description="Cap on validation batches per evaluation; unset = all.")


class MlflowSpec(StrictModel):
    """Tracking and registration."""

    experiment: str = Field(default="llm-platform", min_length=1, description="MLflow experiment for the run.")
    registered_model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.\-]*$", description="On success the adapter becomes a new version of this registered model; unset = not registered.")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking server; default: the embedded stack's or `$MLFLOW_TRACKING_URI`.")


class SweepSection(StrictModel):
    """A hyperparameter sweep of this spec on Ray Tune: each trial is the spec with one combination of `params` (the
    fields of `platformctl finetune sweep`'s flags); only the best trial's adapter is registered."""

    params: dict[str, list[Any]] = Field(min_length=1, description="Spec fields to sweep and the values to try, e.g. `{hyperparameters.learning_rate: [1e-4, 3e-4], lora.rank: [8, 16]}` (the CLI's `--param PATH=V1,V2`); each path is a field of this spec.")
    search: Literal["grid", "random"] = Field(default="grid", description="`grid`: every combination; `random`: `trials` seeded draws (`--search`).")
    trials: int | None = Field(default=None, ge=1, description="Random search: how many trials (`--trials`); not used by a grid.")
    metric: Literal["eval_loss", "eval_perplexity", "eval_token_accuracy", "loss"] = Field(default="eval_loss", description="What picks the best trial (`--metric`).")
    mode: Literal["min", "max"] = Field(default="min", description="Whether a lower or higher `metric` is better (`--mode`).")
    max_concurrent: int = Field(default=2, ge=1, description="Trials running at once (`--max-concurrent`); on Kubernetes the worker group holds this many trials' pods.")
    early_stop: Literal["none", "asha"] = Field(default="none", description="`asha` stops trials that rank badly at eval steps (eval.every_n_steps, then x2, x4 ...) (`--early-stop`).")


class FineTuneSpec(StrictModel):
    """A LoRA or QLoRA fine-tuning job for a Llama 2 base model."""

    name: str = Field(pattern=DNS_LABEL, description="Job name: lowercase letters, digits and '-', at most 63 characters (a Kubernetes name).")
    base_model: str = Field(min_length=1, description="Base model: a catalog name (`llama2-7b`, `llama2-13b-chat`, `llama2-tiny`, ...), a local directory, or a Hugging Face id.")
    method: Literal["lora", "qlora"] = Field(default="lora", description="`lora` trains adapters on a bf16/fp32 base; `qlora` on a 4-bit NF4 base.")
    objective: Literal["sft", "dpo"] = Field(default="sft", description="`sft`: supervised tuning on answers; `dpo`: preference tuning (Direct Preference Optimization) on `prompt`/`chosen`/`rejected` records, against the frozen base as reference.")
    data: DataSpec = Field(description="Training and validation data.")
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="Preference-tuning settings (used when objective is dpo).")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape.")
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec, description="4-bit settings (used when method is qlora).")
    hyperparameters: HyperParameters = Field(default_factory=HyperParameters, description="Optimiser and schedule.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Workers and what each gets.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint cadence and storage.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation cadence.")
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec, description="Tracking and registration.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Kubernetes Secrets and model cache for this job's pods (operator only; other targets ignore it).")
    sweep: SweepSection | None = Field(default=None, description="Run this spec as a hyperparameter sweep (`platformctl finetune sweep`; a FineTuneJob with this section on Kubernetes); unset = one training run.")

    @model_validator(mode="after")
    def _consistent(self) -> "FineTuneSpec":
        if self.resources.gpus_per_worker and self.resources.gpus_per_worker != int(self.resources.gpus_per_worker) and self.resources.gpus_per_worker > 1:
            raise ValueError("resources.gpus_per_worker above 1 must be a whole number")
        if self.resources.strategy == "fsdp" and self.resources.workers > 1 and self.hyperparameters.optimizer != "adamw":
            # bitsandbytes optimizers have no DTensor support: their step fails on sharded parameters
            raise ValueError(f"resources.strategy 'fsdp' does not work with hyperparameters.optimizer '{self.hyperparameters.optimizer}' "
                             "(bitsandbytes optimizers cannot update sharded parameters); set hyperparameters.optimizer: adamw, "
                             "or resources.strategy: ddp")
        return self


# ---------------------------------------------------------------------------- serving


class AdapterRef(StrictModel):
    """A LoRA adapter to serve on the base model."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$", description="Name clients use: `BASE:NAME` in the request's `model`.")
    source: str = Field(min_length=1, description="A local adapter directory, an object-store URI, or a registry reference `models:/NAME@ALIAS` or `models:/NAME/VERSION`.")


class ModelSource(StrictModel):
    """What the deployment serves: a base and adapters, or a registry reference."""

    base: str | None = Field(default=None, description="Base model (catalog name, directory or HF id). May be omitted with `registry`: the base then comes from the registered version's lineage.")
    adapters: list[AdapterRef] = Field(default_factory=list, description="Adapters served beside the base (multi-LoRA).")
    registry: str | None = Field(default=None, description="Registry reference `models:/NAME@ALIAS` (followed when the alias moves) or `models:/NAME/VERSION` (pinned).")
    allow_dynamic_adapters: bool = Field(default=True, description="Let requests name any registered version (`NAME@ALIAS`, `NAME/VERSION`) beyond the listed adapters.")

    @field_validator("registry")
    @classmethod
    def _registry_uri(cls, value: str | None) -> str | None:
        if value is not None and not REGISTRY_URI.match(value):
            raise ValueError("must look like models:/NAME@ALIAS or models:/NAME/VERSION")
        return value

    @model_validator(mode="after")
    def _has_something(self) -> "ModelSource":
        if not self.base and not self.registry:
            raise ValueError("set `base` (a base model), `registry` (models:/NAME@ALIAS), or both")
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique; repeated: {dupes}")
        return self


class AutoscalingSpec(StrictModel):
    """Replica count: fixed (min == max) or autoscaled on the metric chosen (ongoing requests,
    the engines' queue of waiting requests, or their KV-cache use)."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas; 0 allows scale to zero.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at deploy time; default min_replicas (at least 1).")
    target_ongoing_requests: float = Field(default=16.0, gt=0, description="Requests in flight per replica the autoscaler aims for.")
    downscale_delay_s: float = Field(default=300.0, ge=0, description="Seconds of low load before removing a replica.")
    metric: Literal["ongoing_requests", "queue_depth", "kv_cache"] = Field(default="ongoing_requests", description="What scaling follows: `ongoing_requests` (requests in flight per replica, Ray Serve's default policy), `queue_depth` (requests waiting in the engines for a batch row, per replica), or `kv_cache` (the engines' KV-cache use, 0-1, averaged over replicas).")
    target: float | None = Field(default=None, gt=0, description="Per-replica value of `metric` the autoscaler aims for. Unset: `target_ongoing_requests` for `ongoing_requests`, 2 waiting requests for `queue_depth`, 0.7 for `kv_cache` (must be at most 1).")
    downscale_to_zero_delay_s: float | None = Field(default=None, ge=0, description="With `min_replicas: 0`, seconds without requests before the last replica is removed; unset: `downscale_delay_s`. The first request afterwards is held until a replica is up (`serve status` shows that cold start).")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.metric == "kv_cache" and self.target is not None and self.target > 1:
            raise ValueError(f"target ({self.target}) for metric kv_cache is a fraction of the KV cache: set 0 < target <= 1, e.g. 0.7")
        return self


class LimitsSpec(StrictModel):
    """Concurrency and request limits; beyond them clients get 429/503 with Retry-After."""

    max_concurrent_requests: int = Field(default=64, ge=1, description="Requests a replica runs at once (its batch).")
    max_queued_requests: int = Field(default=128, ge=0, description="Requests waiting beyond those; more are refused with 429 and Retry-After.")
    max_batch_size: int = Field(default=32, ge=1, description="Sequences decoded together per step (hf engine).")
    request_timeout_s: float = Field(default=120.0, gt=0, description="A request running longer is ended with an error; no connection hangs.")
    default_max_tokens: int = Field(default=256, ge=1, description="`max_tokens` when a request does not set it.")
    max_n: int = Field(default=4, ge=1, le=128, description="Most choices (`n`) one request may ask for; each choice is decoded as its own sequence in the batch. A larger `n` is refused with 400 naming `n`.")
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest request body in bytes (default 1 MiB); a larger one is refused with 413 before it is read or parsed.")
    registry_lookup_timeout_s: float = Field(default=5.0, gt=0, le=600, description="Longest a request waits for the registry to resolve a name not yet loaded (`NAME@ALIAS`, `NAME/VERSION`), and never past `request_timeout_s`; then 503 with Retry-After. Names already loaded never wait for the registry.")
    stream_interval_ms: float = Field(default=50.0, ge=0, le=1000, description="After a replica sends a stream chunk it waits this long before taking the next; tokens generated meanwhile go out as one chunk. The first token is never held back. Fewer, larger chunks cost the serving path less CPU per token (as Ray Serve LLM's stream batching, also 50 ms); 0 sends every token on its own.")


class AuthSpec(StrictModel):
    """API-key authentication (keys are stored as SHA-256 hashes)."""

    enabled: bool = Field(default=False, description="Require `Authorization: Bearer <key>` on /v1 routes, `/docs`, `/openapi.json` and (unless `public_metrics`) `/metrics`.")
    api_keys_file: str | None = Field(default=None, description="File with one key hash (`sha256:<hex>`) or plain key per line; plain keys are hashed on load. After the key, optional `name=NAME` (its identity in `platformctl usage`; default `key-<hash prefix>`), `rpm=N` and `tpm=N` (requests and tokens per minute, enforced across all ingress replicas; 429 + Retry-After beyond). `platformctl keys add` appends a new key. Read when a replica starts and again within a second of a change. On Kubernetes the operator mounts the API-key Secret and uses its file (`/etc/llm-platform/api-keys/keys`) instead.")
    api_keys_env: str | None = Field(default="PLATFORM_API_KEYS", description="Env var with comma-separated keys or `sha256:` hashes (each optionally followed by `name=`, `rpm=`, `tpm=` as in the keys file), read from the Serve processes' environment. Nothing sets it on Kubernetes pods: there the keys come from the API-key Secret (`cluster.api_keys_secret`).")
    public_metrics: bool = Field(default=False, description="Serve `/metrics` without a key when auth is on (for a Prometheus that scrapes without credentials). `/docs` and `/openapi.json` always need a key when auth is on; `/healthz` never does.")


class ServeResources(StrictModel):
    """What one replica reserves."""

    gpus_per_shard: float = Field(default=0.0, ge=0, description="GPUs per tensor-parallel shard (one bundle each); 0 on CPU.")
    cpus_per_shard: float = Field(default=1.0, gt=0, description="CPUs per tensor-parallel shard.")
    accelerator_resource: str | None = Field(default=None, description="Custom Ray resource name standing in for a GPU (tests, heterogeneous pools).")
    gpu_type: str | None = Field(default=None, description="GPU model for the planner, e.g. `a100-80gb`.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes node selector for serving pods.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Kubernetes tolerations for serving pods.")


class ServeSpec(StrictModel):
    """An OpenAI-compatible deployment of a Llama 2 base model and its adapters on Ray Serve."""

    name: str = Field(pattern=DNS_LABEL, description="Deployment name (a Kubernetes name); also the Serve application name.")
    model: ModelSource = Field(description="Base model, adapters and/or registry reference.")
    engine: Literal["auto", "vllm", "hf"] = Field(default="auto", description="`vllm` (GPU production engine), `hf` (transformers, batched), or `auto` (vllm when importable and usable).")
    topology: Literal["auto", "split", "colocated"] = Field(default="auto", description="`split`: the HTTP ingress and the engine are separate deployments and Serve routes each request to an engine replica holding its adapter (multiplexing). `colocated`: the engine runs inside the ingress replica, one Ray hop less per streamed token, with no adapter-affinity routing between replicas. `auto`: colocated for the vllm engine with exactly one replica (vLLM batches adapters itself and there is no routing to do), split otherwise.")
    tensor_parallel: int | Literal["auto"] = Field(default=1, description="Shards per replica (one placement-group bundle each), or `auto` to let the planner pick for the GPU type.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="Weights/activations dtype; `auto` is bf16 on GPU, fp32 on CPU.")
    max_model_len: int = Field(default=4096, ge=16, le=32768, description="Prompt + generated tokens per request (Llama 2: 4096).")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replicas and autoscaling.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Concurrency, queue and timeouts.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API-key authentication.")
    resources: ServeResources = Field(default_factory=ServeResources, description="What a replica reserves.")
    max_loaded_adapters: int = Field(default=8, ge=1, description="LRU bound on adapters held per replica.")
    max_lora_rank: int | None = Field(default=None, ge=1, le=1024, description="Largest LoRA rank the vllm engine accepts (vLLM allows 8, 16, 32, 64, 128, 256, 320, 512). Unset: the largest rank of the listed and registry adapters, at least 64. `platformctl spec resolve` refuses an adapter above it.")
    registry_poll_s: float = Field(default=10.0, gt=0, le=3600, description="How often aliases are re-resolved; a moved alias is served within this delay.")
    route_prefix: str = Field(default="/", pattern=r"^/", description="HTTP route prefix of the application.")
    tracking_uri: str | None = Field(default=None, description="MLflow server for registry references; default: the embedded stack's or `$MLFLOW_TRACKING_URI`.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Kubernetes Secrets and model cache for this deployment's pods (operator only; other targets ignore it).")

    @field_validator("tensor_parallel")
    @classmethod
    def _tp(cls, value: int | str) -> int | str:
        if isinstance(value, int) and (value < 1 or value & (value - 1)):
            raise ValueError("must be a power of two (1, 2, 4, 8, ...) or 'auto'")
        return value


# ---------------------------------------------------------------------------- evaluation

EVAL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_\-]*$"  # no dots: it is one segment of the tag `eval.<dataset>.<metric>`


class EvalDatasetSpec(StrictModel):
    """Held-out data: the formats and record checks of training data; the last assistant turn is the reference."""

    name: str = Field(pattern=EVAL_NAME, description="Dataset name in the version tags `eval.<name>.<metric>` (letters, digits, '_' and '-').")
    path: str = Field(min_length=1, description="A local path or object-store URI to a JSONL, JSON or Parquet file, or an `hf://datasets/OWNER/NAME?split=...` dataset (chat, sharegpt, prompt_completion or alpaca records).")
    format: Literal["auto", "chat", "sharegpt", "prompt_completion", "alpaca"] = Field(default="auto", description="Record shape, as in fine-tuning data; `auto` detects it.")
    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N records; unset = all.")
    max_seq_length: int = Field(default=1024, ge=16, le=32768, description="Tokens of prompt plus reference per example; longer ones are cut as in training.")


class MetricSpec(StrictModel):
    """One score per example, averaged over the dataset."""

    scorer: str = Field(min_length=1, description="exact_match, contains, token_f1, regex, json_valid, perplexity (of the reference under the model; lower is better), or a user scorer `python:package.module:function` taking (prediction, reference).")
    name: str | None = Field(default=None, pattern=EVAL_NAME, description="Metric name in MLflow and the version tags; default: the scorer's name (the function's for a user scorer).")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the scorer, e.g. `{pattern: '^\\d+$'}` for regex, `{ignore_case: false}` for exact_match.")

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value: str) -> str:
        from llmplatform.evaluation import scorers

        try:
            scorers.check_name(value)
        except scorers.ScorerError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _scorer_params(self) -> "MetricSpec":
        from llmplatform.evaluation import scorers

        try:
            scorers.check_params(self.scorer, self.params)
        except scorers.ScorerError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def metric(self) -> str:
        return self.name or self.scorer.rsplit(":", 1)[-1]


class GenerationSpec(StrictModel):
    """Greedy decoding settings of the evaluation."""

    max_tokens: int = Field(default=64, ge=1, le=4096, description="New tokens per answer at most (answers end earlier at EOS).")
    batch_size: int = Field(default=16, ge=1, le=512, description="Examples decoded together by the engine.")


class EvalMlflowSpec(StrictModel):
    """Where the evaluation runs are recorded."""

    experiment: str = Field(default="llm-platform-eval", min_length=1, description="MLflow experiment of the runs (one run per model).")


class EvalResourcesSpec(StrictModel):
    """What the evaluation's Ray pod gets on Kubernetes (the job runs in one process there, its engine on these GPUs)."""

    cpus: float = Field(default=4.0, gt=0, description="CPUs of the evaluation's worker pod, all reserved for the job.")
    gpus: int = Field(default=0, ge=0, le=8, description="GPUs of the worker pod (0 = CPU generation); the engine runs on them.")
    memory_gb: float = Field(default=16.0, gt=0, description="Memory of the worker pod (Kubernetes request and limit).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes node selector for the worker pod.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Kubernetes tolerations for the worker pod.")


class EvaluationSpec(StrictModel):
    """An evaluation job: models answer a held-out dataset, scorers grade the answers."""

    name: str = Field(pattern=DNS_LABEL, description="Job name: lowercase letters, digits and '-', at most 63 characters.")
    models: list[str] = Field(min_length=1, description="Models to evaluate: a base model (`llama2-tiny`, a directory, an HF id) or a registered adapter `NAME@ALIAS` / `NAME/VERSION` (also with a `models:/` prefix).")
    dataset: EvalDatasetSpec = Field(description="The held-out data.")
    metrics: list[MetricSpec] = Field(default_factory=lambda: [{"scorer": "exact_match"}], min_length=1, description="Scorers to run; a bare scorer name is accepted for an item (`- exact_match`).")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Decoding settings.")
    mlflow: EvalMlflowSpec = Field(default_factory=EvalMlflowSpec, description="Tracking.")
    resources: EvalResourcesSpec = Field(default_factory=EvalResourcesSpec, description="The evaluation's pod on Kubernetes (an EvaluationJob; other targets ignore it).")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Kubernetes Secrets and model cache for this job's pods (operator only; other targets ignore it).")

    @field_validator("metrics", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        return [{"scorer": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _unique_metrics(self) -> "EvaluationSpec":
        names = [m.metric for m in self.metrics]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"metric names must be unique; repeated: {dupes} (give each a `name`)")
        repeated = sorted({m for m in self.models if self.models.count(m) > 1})
        if repeated:
            raise ValueError(f"models must be unique; repeated: {repeated}")
        return self


SPEC_KINDS: dict[str, type[StrictModel]] = {"finetune": FineTuneSpec, "serve": ServeSpec, "eval": EvaluationSpec}


# ---------------------------------------------------------------------------- loading


def _accepted(model: type[BaseModel] | None, err: dict[str, Any]) -> str:
    """What would have been accepted, in words, for one pydantic error."""
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "literal_error":
        return str(ctx.get("expected", ""))
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "")
        return f"a number {sign} {bound}"
    if kind == "string_pattern_mismatch":
        return f"text matching {ctx.get('pattern')}"
    if kind == "extra_forbidden" and model is not None:
        return "one of " + ", ".join(sorted(model.model_fields))
    if kind == "missing":
        return "a value (this field is required)"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return kind.replace("_parsing", "").replace("_type", "")
    return ""


def _model_at(root: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the last element of `path`."""
    model: Any = root
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            inner = getattr(cand, "__args__", ())
            found = next((c for c in (cand, *inner) if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if found is not None:
                model = found
                break
        else:
            return None
    return model if isinstance(model, type) else None


def problems_from_validation(root: type[BaseModel], exc: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into `Problem`s with dotted paths and 'did you mean' hints."""
    problems = []
    for err in exc.errors(include_url=False):
        path = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("function-after",))))
        where = ".".join(str(p) for p in path) or "(top level)"
        owner = _model_at(root, path) if path else root
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and owner is not None and path:
            close = difflib.get_close_matches(str(path[-1]), list(owner.model_fields), n=1)
            message = "unknown field" + (f"; did you mean '{close[0]}'?" if close else "")
        given = None if err["type"] == "missing" else err.get("input")
        if isinstance(given, dict):
            given = "{...}"
        problems.append(Problem(where, message, given, _accepted(owner, err)))
    return problems


def parse_spec(kind: str, data: Any, source: str = "<spec>") -> StrictModel:
    """Validate already-parsed data as a spec of `kind`; raise SpecError with every problem."""
    model = SPEC_KINDS[kind]
    if not isinstance(data, dict):
        raise SpecError(source, [Problem("(top level)", "a spec must be a mapping of fields", type(data).__name__, "a YAML/JSON object")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, problems_from_validation(model, exc)) from None


def read_document(path: str | Path) -> tuple[str | None, dict]:
    """Read a YAML/JSON spec file. Returns (kind, body).

    A file may be a bare spec, or wrapped as `{kind: FineTuneJob|ModelDeployment|EvaluationJob, spec: {...}}`
    (the Kubernetes CR shape; `metadata.name` then fills `name`).
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [Problem("(file)", "file not found", str(path), "a readable YAML or JSON file")])
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else f"line {getattr(exc, 'lineno', '?')}"
        raise SpecError(str(path), [Problem(where, f"not valid YAML/JSON: {getattr(exc, 'problem', None) or exc}")]) from None
    if not isinstance(data, dict):
        raise SpecError(str(path), [Problem("(top level)", "a spec must be a mapping of fields", type(data).__name__, "a YAML/JSON object")])
    cr_kind = {"FineTuneJob": "finetune", "ModelDeployment": "serve", "EvaluationJob": "eval"}.get(str(data.get("kind")))
    if cr_kind:
        body = dict(data.get("spec") or {})
        name = (data.get("metadata") or {}).get("name")
        if name and "name" not in body:
            body["name"] = name
        return cr_kind, body
    return None, data


def guess_kind(body: dict) -> str:
    """finetune, serve or eval, from the fields present."""
    if "models" in body or "metrics" in body:
        return "eval"
    if "model" in body or "engine" in body or "autoscaling" in body:
        return "serve"
    return "finetune"


def load_spec(path: str | Path, kind: str | None = None) -> StrictModel:
    """Load and validate a spec file; the kind is given, read from `kind:`, or guessed."""
    doc_kind, body = read_document(path)
    kind = kind or doc_kind or guess_kind(body)
    if doc_kind and kind != doc_kind:
        raise SpecError(str(path), [Problem("kind", f"this is a {doc_kind} spec, expected {kind}", doc_kind, kind)])
    return parse_spec(kind, body, str(path))


def spec_kind(spec: StrictModel) -> str:
    return next(k for k, m in SPEC_KINDS.items() if isinstance(spec, m))


def json_schema(kind: str) -> dict:
    """The JSON schema of a spec kind (what `platformctl spec schema` prints)."""
    if kind not in SPEC_KINDS:
        raise SpecError("spec schema", [Problem("kind", "unknown spec kind", kind, " | ".join(SPEC_KINDS))])
    return SPEC_KINDS[kind].model_json_schema()


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def resolve_local_paths(spec: FineTuneSpec, base_dir: str | Path | None = None) -> FineTuneSpec:
    """A copy of `spec` whose relative local paths (data, checkpoint storage) are absolute.

    Paths in a spec are relative to where the command runs (as `data validate` reads them);
    Ray workers run elsewhere, so jobs are submitted with absolute paths. URIs are untouched.
    """
    base = Path(base_dir or Path.cwd())

    def absolute(uri: str | None) -> str | None:
        if uri is None or not _is_local(uri):
            return uri
        path = Path(uri.removeprefix("file://")).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    data = spec.data.model_copy(update={"train": absolute(spec.data.train), "validation": absolute(spec.data.validation)})
    checkpoint = spec.checkpoint.model_copy(update={"storage_uri": absolute(spec.checkpoint.storage_uri)})
    return spec.model_copy(update={"data": data, "checkpoint": checkpoint})
