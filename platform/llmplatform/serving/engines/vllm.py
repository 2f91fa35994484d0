"""The `vllm` engine: vLLM's async engine (PagedAttention, continuous batching, multi-LoRA, TP).

Imported only when chosen. Tensor parallelism on GPUs uses vLLM's Ray executor, which places its
shard workers in the placement group the Serve replica already reserved (one bundle per shard).
vLLM's CPU backend has no Ray executor: there the shards are local processes (`mp`) on the
replica's node, each bound to its own share of the CPUs (STRICT_PACK reserved them). LoRA
adapters become `LoRARequest`s with a stable integer id per adapter id; vLLM loads them lazily
and keeps `max_loras` on the device. `n`, logprobs, penalties, logit_bias and structured outputs
(`response_format`) are vLLM's own (`sampling_kwargs`); `vllm_json` closes json_object within
`max_tokens`. Events match the hf engine's, so the ingress can't tell them apart.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import uuid
from typing import AsyncIterator

from llmplatform import cpus
from llmplatform.serving.engines import EngineError, GenerationRequest, check_request

logger = logging.getLogger(__name__)


STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
"""vLLM's StructuredOutputsConfig for every deployment (keywords; `VLLMEngine` builds the object)."""
JSON_CLOSER = "llmplatform.serving.engines.vllm_json:JsonObjectCloser"


def engine_args(model_dir: str, *, dtype: str, max_model_len: int, tensor_parallel: int, max_batch_size: int,
                lora_slots: dict | None = None, max_lora_rank: int = 64, enable_lora: bool = True, cuda: bool | None = None,
                served_name: str | None = None) -> dict:
    """AsyncEngineArgs keywords (pure, so tests can check them without vLLM; `structured_outputs_config`
    stays a dict here and becomes vLLM's StructuredOutputsConfig in `VLLMEngine`).

    `served_name` becomes vLLM's `served_model_name`, the `model_name` label of vLLM's metrics (else
    vLLM labels them with the weights' path). Stats stay on: vLLM's PrometheusStatLogger feeds /metrics.
    `enable_lora=False` for base-only deployments: vLLM's LoRA layers cost every request time,
    adapter or not (on CPU they cut base-model throughput by several times). `lora_slots` is the
    resolved plan's (`max_loras`, `max_cpu_loras`), required with LoRA on."""
    args = {
        "model": model_dir, "tokenizer": model_dir, "dtype": "auto" if dtype == "auto" else dtype,
        "max_model_len": max_model_len, "tensor_parallel_size": tensor_parallel, "max_num_seqs": max_batch_size,
        "enable_prefix_caching": False, "enable_lora": enable_lora, "disable_log_stats": False,
        # response_format: JSON with no whitespace outside strings (else a model may pad with spaces
        # until max_tokens). vLLM allows disable_any_whitespace only with a named backend (xgrammar
        # or guidance), not "auto".
        "structured_outputs_config": dict(STRUCTURED_OUTPUTS),
    }
    cuda = _has_cuda() if cuda is None else cuda
    if not cuda:
        # json_object closed within max_tokens (vllm_json). A V1-runner logits processor: vLLM's CPU
        # backend runs the V1 model runner; on GPUs vLLM picks Model Runner V2, whose processors
        # have another interface, so there json_object has the grammar's guarantees only.
        args["logits_processors"] = [JSON_CLOSER]
    if served_name:
        args["served_model_name"] = served_name
    if enable_lora:
        if not lora_slots:
            raise ValueError("engine_args: LoRA on needs the plan's lora_slots (max_loras, max_cpu_loras)")
        args.update({"max_loras": lora_slots["max_loras"], "max_cpu_loras": lora_slots["max_cpu_loras"], "max_lora_rank": max_lora_rank})
    if tensor_parallel > 1:
        # GPUs: shards go into the replica's placement group. CPU: vLLM refuses Ray ("current platform cpu
        # does not support ray"), so the shards are processes of this replica on its node.
        args["distributed_executor_backend"] = "ray" if cuda else "mp"
    fraction = os.environ.get("PLATFORM_VLLM_MEMORY_FRACTION") or (None if cuda else "0.15")
    if fraction:
        # On the CPU backend this is the share of *host* memory vLLM reserves (default 0.92 fails on a shared box).
        args["gpu_memory_utilization"] = float(fraction)
    return args


def structured_outputs(response_format: dict | None) -> dict | None:
    """OpenAI's `response_format` as `StructuredOutputsParams` keywords (vLLM >= 0.11), or None for plain text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        return {"json": response_format["json_schema"]["schema"]}
    return None


def sampling_kwargs(req: GenerationRequest) -> dict:
    """SamplingParams keywords for a request (pure, so tests can check them without vLLM);
    `structured_outputs` stays a dict here and becomes StructuredOutputsParams in `generate`."""
    kwargs = {"n": req.n, "max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p, "stop": req.stop or None,
              "seed": req.seed, "ignore_eos": req.ignore_eos, "presence_penalty": req.presence_penalty,
              "frequency_penalty": req.frequency_penalty, "logit_bias": dict(req.logit_bias) or None, "logprobs": req.logprobs}
    structured = structured_outputs(req.response_format)
    if structured:
        kwargs["structured_outputs"] = structured
    return kwargs


def logprob_entries(token_ids, logprobs, top: int) -> list[dict]:
    """vLLM's per-token logprobs (dicts token id -> Logprob with `.logprob`, `.rank`) as engine events' entries."""
    out = []
    for tid, alts in zip(token_ids, logprobs or []):
        best = sorted(((t, lp) for t, lp in alts.items() if lp.rank is not None and lp.rank <= top), key=lambda x: x[1].rank)
        out.append({"id": int(tid), "logprob": float(alts[tid].logprob), "top": [[int(t), float(lp.logprob)] for t, lp in best[:top]]})
    return out


def check_rank(adapter_id: str, path: str, max_lora_rank: int | None) -> None:
    """Refuse an adapter whose LoRA rank is above the rank this engine was started with (the
    resolved plan's `max_lora_rank`), with a 400 naming both, before vLLM fails mid-request."""
    import json
    from pathlib import Path

    try:
        rank = json.loads((Path(path) / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError):
        return  # vLLM reports unreadable adapters itself
    if max_lora_rank and isinstance(rank, int) and rank > max_lora_rank:
        raise EngineError(f"adapter {adapter_id!r} has LoRA rank {rank}, above this deployment's max_lora_rank {max_lora_rank}; "
                          f"redeploy with max_lora_rank >= {rank}", 400, "adapter_incompatible")


def cpu_shard_binding(allowed: list[int], tensor_parallel: int) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` for CPU shards: the CPUs split into `tensor_parallel` contiguous
    groups ("0,1,2,3|4,5,6,7"; one shard gets them all). vLLM's own `auto` wants one NUMA node per
    shard and fails on a one-node machine; None when there are fewer CPUs than shards (let vLLM
    report it)."""
    ids = sorted(allowed)
    if len(ids) < max(1, tensor_parallel):
        return None
    size = len(ids) // tensor_parallel
    groups = [ids[i * size:(i + 1) * size] for i in range(tensor_parallel)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def shard_cpus(tensor_parallel: int, partition: cpus.CpuPartition | None, allowed: list[int], numa_nodes: int) -> list[int] | None:
    """The CPUs to split among vLLM's CPU shards, or None to leave vLLM's own binding alone.

    In a partitioned stack (see llmplatform.cpus): the model CPUs, or every CPU of the
    partition when there are fewer model CPUs than shards. Otherwise only when vLLM's `auto`
    would fail (fewer NUMA nodes than shards): the CPUs this process may use."""
    if partition:
        return list(partition.model) if len(partition.model) >= tensor_parallel else list(partition.all)
    return allowed if numa_nodes < tensor_parallel else None


def _numa_nodes() -> int:
    from pathlib import Path

    return len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1


SCHEDULER_NICE = -10
"""Priority of vLLM's scheduler process in a partitioned stack (see `_start_partitioned`)."""


def _start_partitioned(start, partition: cpus.CpuPartition) -> tuple[object, int | None]:
    """Start vLLM's processes in a partitioned stack: (engine, the scheduler's nice or None).

    OpenMP binds the shards only to CPUs they inherit, and this replica runs on the front CPUs;
    so vLLM is started from this thread widened to the whole partition. Afterwards the replica's
    own threads and vLLM's helper processes go back to the front CPUs. The shards stay bound to
    the model CPUs.

    The scheduler (`VLLM::EngineCore`) keeps the whole partition, as under `vllm serve`: held on
    the busy front CPUs it delayed every step (511 vs 581 tok/s at 16 streams on 2 cores). It also
    gets priority `SCHEDULER_NICE`: every model step waits on it, but Ray starts its workers at
    nice 15 and vLLM's processes inherit that, so anything at the default priority ran ahead of
    it. Measured on 2 cores at 16 streams (bench/serve_priority.py): +1% and +3% tok/s over Ray's
    default in two A/Bs, +10% over Ray workers at nice 0. A nice below 0 needs root,
    CAP_SYS_NICE or a limits.conf `nice` entry; without them the scheduler keeps Ray's priority
    and the replica logs it.
    """
    own = cpus.allowed_cpus()
    cpus.set_thread_cpus(partition.all)
    try:
        engine = start()
    finally:  # this thread and the helper threads it started meanwhile
        cpus.set_process_cpus(os.getpid(), own)
    nice: int | None = None
    for pid, comm in cpus.descendants(os.getpid()):
        if comm.startswith("VLLM::EngineCor"):
            if cpus.set_process_nice(pid, SCHEDULER_NICE):
                nice = SCHEDULER_NICE
            else:
                logger.info("vLLM's scheduler keeps Ray's worker CPU priority: nice %d needs root, CAP_SYS_NICE or "
                            "a `nice %d` entry for this user in /etc/security/limits.conf (a few percent of "
                            "throughput on a busy CPU-only host)", SCHEDULER_NICE, SCHEDULER_NICE)
        elif not comm.startswith("VLLM::Worker"):
            cpus.set_process_cpus(pid, partition.front)
    return engine, nice


def _prometheus_registry():
    """The registry vLLM's PrometheusStatLogger writes to in this process (the global one unless
    PROMETHEUS_MULTIPROC_DIR is set, as vLLM's own API server decides)."""
    try:
        from vllm.v1.metrics.prometheus import get_prometheus_registry
    except ImportError:  # older vLLM
        from prometheus_client import REGISTRY

        return REGISTRY
    return get_prometheus_registry()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _use_platform_lora_ops() -> str:
    """vLLM's CPU LoRA ops -> ours (vllm_lora_cpu), in the processes vLLM is about to start (its
    general plugin, found through the installed entry point or a metadata folder on PYTHONPATH)
    and in this one (an in-process engine core). Returns whose ops run: `platform` or `vllm`."""
    from llmplatform.serving.engines import vllm_lora_cpu

    plugin_dir = None if vllm_lora_cpu.plugin_installed() else str(vllm_lora_cpu.private_plugin_path())
    source = vllm_lora_cpu.source_dir()
    os.environ.update(vllm_lora_cpu.engine_env(os.environ, plugin_dir, source))
    # vLLM spawns its processes with multiprocessing, which gives each child this process's
    # sys.path, not the PYTHONPATH above: the folders go first here too
    sys.path[:0] = [d for d in (plugin_dir, source) if d and d not in sys.path]
    return "platform" if vllm_lora_cpu.register() else "vllm"


def _compiled(engine) -> bool | None:
    """Whether vLLM compiles the model (torch.compile), from the config it settled on; None if unknown."""
    try:
        from vllm.config import CompilationMode

        return engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    except (AttributeError, ImportError):
        return None


class VLLMEngine:
    """vLLM AsyncLLM behind the engine interface (generate / load_adapter / unload_adapter / info)."""

    def __init__(self, model_dir: str, *, dtype: str = "auto", max_model_len: int = 4096, tensor_parallel: int = 1,
                 max_batch_size: int = 32, lora_slots: dict | None = None, enable_lora: bool = True, max_lora_rank: int = 64,
                 served_name: str | None = None):
        from vllm import AsyncEngineArgs

        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:  # older vLLM
            from vllm import AsyncLLMEngine as AsyncLLM

        self.model_dir = model_dir
        self.tensor_parallel = tensor_parallel
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        cuda = _has_cuda()
        self.args = engine_args(model_dir, dtype=dtype, max_model_len=max_model_len, tensor_parallel=tensor_parallel,
                                max_batch_size=max_batch_size, lora_slots=lora_slots, enable_lora=enable_lora,
                                max_lora_rank=max_lora_rank, cuda=cuda, served_name=served_name)
        from vllm.config import StructuredOutputsConfig

        vllm_args = {**self.args, "structured_outputs_config": StructuredOutputsConfig(**self.args["structured_outputs_config"])}
        partition = None if cuda else cpus.from_env()
        binding = None
        if not cuda and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            chosen = shard_cpus(tensor_parallel, partition, list(cpus.allowed_cpus()), _numa_nodes())
            binding = cpu_shard_binding(chosen, tensor_parallel) if chosen else None
            if binding:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding  # read by the shard processes vLLM starts
        self.cpu_binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") if not cuda else None
        self.lora_ops = _use_platform_lora_ops() if enable_lora and not cuda else None
        self.scheduler_nice = None
        if partition and binding:
            self.engine, self.scheduler_nice = _start_partitioned(lambda: AsyncLLM.from_engine_args(AsyncEngineArgs(**vllm_args)),
                                                                  partition)
        else:
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**vllm_args))
        self.compiled = _compiled(self.engine)
        self.adapters: dict[str, tuple[int, str]] = {}  # adapter id -> (lora int id, path)
        self._ids = itertools.count(1)
        self.requests = 0

    def info(self) -> dict:
        return {"engine": "vllm", "model_dir": self.model_dir, "tensor_parallel": self.tensor_parallel,
                "max_batch_size": self.max_batch_size, "adapters_loaded": sorted(self.adapters), "requests": self.requests,
                "executor": self.args.get("distributed_executor_backend", "uni"), "lora_enabled": self.args["enable_lora"],
                "cpu_binding": self.cpu_binding, "scheduler_nice": self.scheduler_nice, "max_lora_rank": self.args.get("max_lora_rank"),
                "lora_ops": self.lora_ops, "compiled": self.compiled}

    def stats(self) -> dict:
        """vLLM's own scheduler gauges (num_requests_running/waiting, kv_cache_usage_perc), read back
        from the Prometheus registry its stat logger writes in this process."""
        from llmplatform.serving.metrics import vllm_stats

        return vllm_stats(_prometheus_registry())

    def exposition(self) -> str:
        """vLLM's own `vllm:` metrics as Prometheus text: what vLLM's server would show at /metrics."""
        from llmplatform.serving.metrics import vllm_exposition

        return vllm_exposition(_prometheus_registry())

    def load_adapter(self, adapter_id: str, path: str) -> None:
        if adapter_id not in self.adapters:
            check_rank(adapter_id, path, self.args.get("max_lora_rank"))
            self.adapters[adapter_id] = (next(self._ids), path)

    def unload_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)  # vLLM evicts device copies itself (LRU over max_loras)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[dict]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        if req.adapter_id and not self.args["enable_lora"]:
            raise EngineError(f"adapter {req.adapter_id!r}: this deployment serves its base model only "
                              "(list adapters, or set model.registry or allow_dynamic_adapters, to serve adapters)", 404, "model_not_found")
        if check_request(req, self.max_model_len, self.adapters):
            self.load_adapter(req.adapter_id, req.adapter_path)
        lora = None
        if req.adapter_id:
            lora_id, path = self.adapters[req.adapter_id]
            lora = LoRARequest(req.adapter_id, lora_id, path)
        kwargs = sampling_kwargs(req)
        if "structured_outputs" in kwargs:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        rid = uuid.uuid4().hex
        self.requests += 1
        tokens = 0
        finishes: dict[int, str] = {}
        try:
            params = SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
            # DELTA (as vLLM's own server streams): each output carries only what is new, and outputs
            # a slow reader hasn't taken yet are merged instead of re-sending the whole text.
            async for out in self.engine.generate({"prompt_token_ids": list(req.prompt_ids)}, params, rid, lora_request=lora):
                for o in out.outputs:
                    tokens += len(o.token_ids)
                    if o.text or o.token_ids:
                        event = {"text": o.text, "completion_tokens": tokens}
                        if req.n > 1:
                            event["index"] = o.index
                        if req.logprobs is not None:
                            event["logprobs"] = logprob_entries(o.token_ids, o.logprobs, req.logprobs)
                        yield event
                    if o.finish_reason:
                        finishes[o.index] = o.finish_reason
                if out.finished:
                    final = {"finish_reason": finishes.get(0, "stop"), "prompt_tokens": len(req.prompt_ids), "completion_tokens": tokens}
                    if req.n > 1:
                        final["choices"] = [{"index": i, "finish_reason": finishes.get(i, "stop")} for i in range(req.n)]
                    yield final
                    return
        except ValueError as exc:  # vLLM rejects bad LoRA files / params with ValueError (VLLMValidationError too)
            raise EngineError(f"vllm refused the request: {exc}") from exc

    def shutdown(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown:
            shutdown()
