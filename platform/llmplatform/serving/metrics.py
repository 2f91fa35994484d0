"""Prometheus metrics at `/metrics`, in vLLM's names and meanings, plus `platform_*` series.

A dashboard or autoscaling rule written for vLLM's own server reads this endpoint unchanged:

| series (`model_name` label) | hf engine: recorded by | vllm engine |
|---|---|---|
| `vllm:time_to_first_token_seconds` | ingress: request arrival -> first token | vLLM's own |
| `vllm:inter_token_latency_seconds` | ingress: gap between tokens, one sample per token | vLLM's own |
| `vllm:e2e_request_latency_seconds` | ingress: arrival -> last token | vLLM's own |
| `vllm:request_queue_time_seconds` | engine: arrival at the engine -> admitted to the batch | vLLM's own |
| `vllm:prompt_tokens_total`, `vllm:generation_tokens_total` | ingress, as tokens are prefilled / streamed | vLLM's own |
| `vllm:request_success_total{finished_reason}` | ingress, at the engine's finish event | vLLM's own |
| `vllm:num_requests_running`, `vllm:num_requests_waiting` | the engine's scheduler (`stats()`) | vLLM's own |
| `vllm:kv_cache_usage_perc` | the engine (`stats()`): dense KV-cache slots in use / capacity | vLLM's own |

With `engine: vllm` the ingress records none of these: the engine replica's vLLM `AsyncLLM` runs
vLLM's `PrometheusStatLogger`, and the replica hands that exposition (the `vllm:` families only)
to the ingress, which appends it. Histogram buckets for the hf engine are vLLM's, so `le` values
match. Platform-only series (requests by HTTP status, auth failures, queue-full rejections,
registry lookups, adapter loads and evictions) are named `platform_*`.

Labels are bounded: `model_name` takes only names the deployment serves (the ids /v1/models
lists), else "unknown"; no key, key name, client label or raw client string becomes a label value.
Each ingress replica keeps its own registry so replicas in one process (tests) don't collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNKNOWN_MODEL = "unknown"
VLLM_PREFIX = "vllm:"
# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so dashboards' `le` selectors match.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                   960.0, 1920.0, 7680.0)

# The vLLM series every deployment exports, by sample-family name (prometheus_client drops `_total`).
VLLM_SERIES = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
               "vllm:request_queue_time_seconds", "vllm:num_requests_running", "vllm:num_requests_waiting",
               "vllm:kv_cache_usage_perc", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success")
FINISH_REASONS = ("stop", "length", "abort")  # vLLM's finished_reason values
STATS_KEYS = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")  # an engine's `stats()`


class VLLMSeries:
    """The vLLM-named series, recorded by the ingress for an engine that doesn't publish them (hf)."""

    def __init__(self, r: CollectorRegistry):
        m = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", m,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", m,
                               buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", m, registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.", m + ["finished_reason"],
                               registry=r)
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", m, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", m, registry=r)
        self.kv_cache = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", m, registry=r)

    def start(self, model: str) -> None:
        """Every series exists from the start for the engine's model, at 0, as vLLM creates them."""
        for metric in (self.ttft, self.itl, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens,
                       self.running, self.waiting, self.kv_cache):
            metric.labels(model)
        for reason in FINISH_REASONS:
            self.success.labels(model, reason)


class ServeMetrics:
    """One ingress replica's metrics. `engine_publishes_vllm`: the engine exports the vllm: series
    itself (engine vllm), so the ingress records only the platform_* ones; `engine_model` is the
    `model_name` the engine's gauges carry (the base model's served name)."""

    def __init__(self, engine_model: str = UNKNOWN_MODEL, engine_publishes_vllm: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.engine_model = engine_model
        self.vllm = None if engine_publishes_vllm else VLLMSeries(r)
        self.requests = Counter("platform_requests", "Requests by served model, endpoint and HTTP status.",
                                ["model_name", "endpoint", "status"], registry=r)
        self.auth_failures = Counter("platform_auth_failures", "Requests refused for a missing or wrong API key.", ["reason"],
                                     registry=r)
        self.rejected = Counter("platform_requests_rejected", "Requests refused before reaching the engine.", ["reason"],
                                registry=r)
        self.in_flight = Gauge("platform_requests_in_flight", "Requests this ingress replica admitted and not finished.",
                               registry=r)
        self.registry_lookups = Counter("platform_registry_lookups", "Model-registry lookups by result (ok, failed: unknown name or registry down).",
                                        ["result"], registry=r)
        self.adapter_loads = Gauge("platform_adapter_loads", "Adapters the engine replica loaded since it started.",
                                   registry=r)
        self.adapter_evictions = Gauge("platform_adapter_evictions", "Adapters the engine replica evicted (LRU) since it started.",
                                       registry=r)
        self.engine_scrape_errors = Counter("platform_engine_metrics_errors", "Scrapes where the engine did not answer in time.",
                                            registry=r)
        # the bounded label values exist from the start, at 0, so rate() and dashboards see them
        for reason in ("missing_key", "invalid_key"):
            self.auth_failures.labels(reason)
        self.rejected.labels("queue_full")
        for result in ("ok", "failed"):
            self.registry_lookups.labels(result)
        if self.vllm:
            self.vllm.start(engine_model)

    @staticmethod
    def label(served_as: str | None) -> str:
        """The `model_name` label for a request: the served name it resolved to, else "unknown"."""
        return served_as or UNKNOWN_MODEL

    # ------------------------------------------------------------------ request path (no-ops for engine vllm)

    def first_token(self, label: str, ttft_s: float, prompt_tokens: int) -> None:
        if self.vllm:
            self.vllm.ttft.labels(label).observe(ttft_s)
            self.vllm.prompt_tokens.labels(label).inc(prompt_tokens)

    def tokens(self, label: str, new_tokens: int, gap_s: float | None) -> None:
        """`new_tokens` arrived `gap_s` after the previous ones: one inter-token sample of
        gap/new per token. `gap_s` None: the first tokens of a request (no inter-token sample)."""
        if self.vllm and new_tokens > 0:
            self.vllm.generation_tokens.labels(label).inc(new_tokens)
            if gap_s is not None:
                itl = self.vllm.itl.labels(label)
                for _ in range(new_tokens):
                    itl.observe(gap_s / new_tokens)

    def finished(self, label: str, event: dict, e2e_s: float) -> None:
        if self.vllm:
            self.vllm.e2e.labels(label).observe(e2e_s)
            self.vllm.success.labels(label, str(event.get("finish_reason") or "stop")).inc()
            if event.get("queue_time_s") is not None:
                self.vllm.queue.labels(label).observe(event["queue_time_s"])

    def aborted(self, label: str) -> None:
        """A request that ended without its finish event (client gone, deadline, engine failure)."""
        if self.vllm:
            self.vllm.success.labels(label, "abort").inc()

    # ------------------------------------------------------------------ exposition

    def render(self, engine: dict | None = None) -> bytes:
        """The exposition: this replica's registry, the engine's gauges from its snapshot
        (`EngineCore.metrics()`), and for engine vllm vLLM's own `vllm:` families appended."""
        engine = engine or {}
        stats = engine.get("stats") or {}
        if self.vllm and stats:
            self.vllm.running.labels(self.engine_model).set(stats.get("num_requests_running", 0))
            self.vllm.waiting.labels(self.engine_model).set(stats.get("num_requests_waiting", 0))
            self.vllm.kv_cache.labels(self.engine_model).set(stats.get("kv_cache_usage_perc", 0.0))
        if "adapter_loads" in engine:
            self.adapter_loads.set(engine["adapter_loads"])
            self.adapter_evictions.set(engine.get("adapter_evictions", 0))
        own = generate_latest(self.registry)
        return own if self.vllm else own + (engine.get("exposition") or "").encode()


class _Only:
    """A registry view with only the families whose name starts with `prefix`."""

    def __init__(self, registry, prefix: str):
        self.registry, self.prefix = registry, prefix

    def collect(self):
        return [f for f in self.registry.collect() if f.name.startswith(self.prefix)]


def counted_lookups(resolve, counter: Counter):
    """`resolve` (a registry resolver: an AdapterTable's, the operator's) counting its calls by result: ok or failed."""
    def counting(*args, **kwargs):
        try:
            found = resolve(*args, **kwargs)
        except BaseException:
            counter.labels("failed").inc()
            raise
        counter.labels("ok").inc()
        return found
    return counting


def vllm_exposition(registry) -> str:
    """The `vllm:` families of `registry` (vLLM's, in the replica running AsyncLLM) as exposition text."""
    return generate_latest(_Only(registry, VLLM_PREFIX)).decode()


def vllm_stats(registry) -> dict:
    """An engine `stats()` dict read from vLLM's own gauges (summed over vLLM's engine cores)."""
    out = {k: 0.0 for k in STATS_KEYS}
    for family in _Only(registry, VLLM_PREFIX).collect():
        key = family.name.removeprefix(VLLM_PREFIX)
        values = [s.value for s in family.samples if s.name == family.name]
        if key in out and values:  # requests add up over vLLM's engine cores; cache use is the fullest one's
            out[key] = max(values) if key == "kv_cache_usage_perc" else sum(values)
    return {"num_requests_running": int(out["num_requests_running"]), "num_requests_waiting": int(out["num_requests_waiting"]),
            "kv_cache_usage_perc": float(out["kv_cache_usage_perc"])}
