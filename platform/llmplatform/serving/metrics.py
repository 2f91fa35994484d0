"""Prometheus metrics of one ingress replica, served at `/metrics`.

TTFT and time per output token (histograms, seconds), tokens in/out and requests by model and
status (counters), requests in flight and queued (gauges). Each ingress replica keeps its own
registry so replicas in one process (tests) don't collide. The `model` label takes only names the
deployment serves (the ids /v1/models lists), else "unknown": a client's raw `model` string never
becomes a label value, so no client can grow /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNKNOWN_MODEL = "unknown"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llm_requests", "Requests by model, endpoint and HTTP status.", ["model", "endpoint", "status"], registry=r)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Time from request to first streamed token.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llm_time_per_output_token_seconds", "Decode time per output token after the first.", ["model"],
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.e2e = Histogram("llm_request_duration_seconds", "Whole request duration.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("llm_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.tokens_out = Counter("llm_completion_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.in_flight = Gauge("llm_requests_in_flight", "Requests admitted and not finished (running + queued).", registry=r)
        self.queue_depth = Gauge("llm_queue_depth", "Admitted requests waiting for a batch slot.", registry=r)
        self.rejected = Counter("llm_requests_rejected", "Requests refused because the queue was full.", registry=r)
        self.rate_limited = Counter("platform_rate_limited", "Requests refused with 429 because their API key was over its requests or tokens per minute (no key label: key names stay out of metrics).", registry=r)

    @staticmethod
    def label(served_as: str | None) -> str:
        """The `model` label for a request: the served name it resolved to, else "unknown"."""
        return served_as or UNKNOWN_MODEL

    def render(self) -> bytes:
        return generate_latest(self.registry)
