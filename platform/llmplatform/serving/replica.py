"""The engine deployment: one model replica (hf or vllm) with multiplexed LoRA adapters.

Ray Serve model multiplexing routes a request whose `multiplexed_model_id` is an adapter id to a
replica that already holds it (adapter affinity) and keeps at most `max_loaded_adapters` per
replica, evicting the least recently used. Errors a request causes come back as an
`{"error", "status", "code"}` event, never as an exception, so the ingress answers 4xx cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from llmplatform.resolve import Resolved
from llmplatform.serving.engines import EngineError, GenerationRequest
from llmplatform.specs import ServeSpec

log = logging.getLogger(__name__)


class _LoadedAdapter:
    """What the multiplexer caches; unloading it (LRU eviction) frees the engine's copy.

    Serve's multiplexer calls `__del__` itself on eviction, and Python calls it again when the
    object is collected, possibly after the same adapter was loaded anew: only the first call
    unloads, or the collection of the old entry would drop the new load from the engine."""

    def __init__(self, engine, adapter_id: str, counts: dict | None = None):
        self.engine, self.adapter_id, self.counts = engine, adapter_id, counts
        self.unloaded = False

    def __del__(self):
        if self.unloaded:
            return
        self.unloaded = True
        try:
            self.engine.unload_adapter(self.adapter_id)
            if self.counts is not None:
                self.counts["adapter_evictions"] += 1
        except Exception:  # interpreter shutdown
            pass


def build_engine(plan: Resolved, base_dir: str):
    """The engine object for this replica, as the plan says (imports vllm only when chosen)."""
    spec: ServeSpec = plan.spec  # type: ignore[assignment]
    if plan["engine"] == "vllm":
        from llmplatform.serving.engines.vllm import VLLMEngine

        return VLLMEngine(base_dir, dtype=spec.dtype, max_model_len=plan["max_model_len"], tensor_parallel=plan["tensor_parallel"],
                          max_batch_size=spec.limits.max_batch_size, lora_slots=plan["lora_slots"],
                          enable_lora=plan["enable_lora"], max_lora_rank=plan["max_lora_rank"] or 16,
                          served_name=str(plan["base_model"]))
    from llmplatform.serving.engines.hf import HFEngine

    threads = int(os.environ.get("PLATFORM_ENGINE_THREADS", "1"))
    return HFEngine(base_dir, dtype=spec.dtype, max_batch_size=spec.limits.max_batch_size, max_model_len=plan["max_model_len"],
                    tensor_parallel=plan["tensor_parallel"], threads=threads, max_loaded_adapters=spec.max_loaded_adapters)


def _gpu_seconds_recorder(plan: Resolved):
    from llmplatform.serving.usage import gpu_seconds_recorder

    try:
        replica = serve.get_replica_context().replica_tag
    except Exception:  # outside a Serve replica (tests)
        replica = ""
    return gpu_seconds_recorder(plan, replica)


class EngineCore:
    """Holds one engine; `generate` streams events for one request. Runs as the `engine`
    deployment (`EngineReplica`), or inside the ingress replica behind `LocalEngine`."""

    def __init__(self, plan: dict, base_dir: str):
        self.plan = Resolved.from_dict(plan, "engine replica args")
        self.spec = self.plan.spec
        self.base_dir = base_dir
        self.started = time.time()
        self.engine = build_engine(self.plan, base_dir)
        self.start_s = round(time.time() - self.started, 3)  # this replica's cold start: engine + model load
        self._paths: dict[str, str] = {}
        self.counts = {"adapter_loads": 0, "adapter_evictions": 0}  # platform_adapter_* on /metrics

        async def load(adapter_id: str) -> _LoadedAdapter:  # a plain function: the multiplexer caches on it
            return await self._load_adapter(adapter_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.spec.max_loaded_adapters)(load)
        self.gpu_seconds = _gpu_seconds_recorder(self.plan)  # this replica's replica-GPU-seconds (usage store)

    def __del__(self):
        if getattr(self, "gpu_seconds", None) is not None:
            self.gpu_seconds.close()

    async def _load_adapter(self, adapter_id: str) -> _LoadedAdapter:
        path = self._paths.get(adapter_id)
        if not path:
            raise EngineError(f"adapter {adapter_id!r} has no path", 404, "model_not_found")
        await asyncio.to_thread(self.engine.load_adapter, adapter_id, path)
        self.counts["adapter_loads"] += 1
        return _LoadedAdapter(self.engine, adapter_id, self.counts)

    async def generate(self, request: dict):
        adapter_id = serve.get_multiplexed_model_id() or request.get("adapter_id")
        try:
            if adapter_id:
                if request.get("adapter_path"):
                    self._paths[adapter_id] = request["adapter_path"]
                await self.get_adapter(adapter_id)
            req = GenerationRequest(**{**request, "adapter_id": adapter_id or None})
            interval = self.spec.limits.stream_interval_ms / 1000
            first = True
            async for event in self.engine.generate(req):
                if first:  # the ingress tells a request held through this replica's start (llmplatform.serving.coldstart)
                    event, first = {**event, "replica_started": self.started, "replica_start_s": self.start_s}, False
                yield event
                if interval and "finish_reason" not in event:
                    await asyncio.sleep(interval)  # both engines merge the deltas that arrive meanwhile
        except EngineError as exc:
            yield {"error": str(exc), "status": exc.status, "code": exc.code}

    def info(self) -> dict:
        ctx = serve.get_replica_context()
        info = dict(self.engine.info())
        info.update({"replica": ctx.replica_id.unique_id, "uptime_s": round(time.time() - self.started, 1), "base_dir": self.base_dir})
        try:
            from ray.util import get_current_placement_group

            pg = get_current_placement_group()
            info["placement_group"] = pg.id.hex() if pg else None
        except Exception:
            info["placement_group"] = None
        return info

    def metrics(self) -> dict:
        """The snapshot the ingress's /metrics shows (llmplatform.serving.metrics): the engine's
        scheduler gauges (`stats()`), vLLM's own exposition when the engine is vLLM, adapter counts."""
        exposition = getattr(self.engine, "exposition", None)
        return {"stats": self.engine.stats(), "exposition": exposition() if exposition else None, **self.counts,
                "replica": serve.get_replica_context().replica_id.unique_id}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics hook: the engine's scheduler gauges, averaged by
        Serve over its look-back window and read by llmplatform.serving.autoscaling.EngineMetricPolicy."""
        return {key: float(value) for key, value in self.engine.stats().items()}

    def check_health(self) -> None:
        thread = getattr(self.engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError("hf decode loop died")


EngineReplica = serve.deployment(name="engine")(EngineCore)


class _Method:
    def __init__(self, call):
        self.remote = call


class LocalStream:
    """What a streaming handle call gives the ingress (`__anext__`, `cancel`), over a local generator."""

    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        return await self._agen.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self._agen.aclose())  # closing the generator aborts the engine's request


class LocalEngine:
    """An in-process EngineCore behind the handle interface the ingress uses
    (`options(...).generate.remote(payload)`, `await info.remote()`), for topology `colocated`."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.generate = _Method(lambda payload: LocalStream(core.generate(payload)))
        self.info = _Method(self._info)
        self.metrics = _Method(self._metrics)

    async def _metrics(self) -> dict:
        return self.core.metrics()

    async def _info(self) -> dict:
        return {**self.core.info(), "topology": "colocated"}

    def options(self, **_routing) -> "LocalEngine":
        return self  # one engine in this replica: nothing to route
