"""/metrics names: vLLM's series with vLLM's label and buckets, platform_* for the rest, bounded labels
(no Ray here: ServeMetrics is fed the way the ingress feeds it, and parsed with prometheus_client's parser)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from llmplatform.serving.metrics import (VLLM_SERIES, ServeMetrics, TTFT_BUCKETS, counted_lookups, vllm_exposition,
                                         vllm_stats)

ENGINE_SNAPSHOT = {"stats": {"num_requests_running": 3, "num_requests_waiting": 2, "kv_cache_usage_perc": 0.25},
                   "exposition": None, "adapter_loads": 4, "adapter_evictions": 1}


def families(text: bytes | str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text if isinstance(text, str) else text.decode())}


def value(fams: dict, sample: str, model: str, **labels) -> float:
    found = [s.value for f in fams.values() for s in f.samples
             if s.name == sample and s.labels.get("model_name") == model and labels.items() <= s.labels.items()]
    assert len(found) == 1, (sample, model, labels, found)
    return found[0]


def one_request(m: ServeMetrics, label: str) -> None:
    m.first_token(label, 0.05, prompt_tokens=12)
    m.tokens(label, 1, None)
    m.tokens(label, 3, 0.03)
    m.finished(label, {"finish_reason": "length", "queue_time_s": 0.01}, 0.2)
    m.requests.labels(label, "chat", "200").inc()


def test_hf_metrics_use_vllms_names_label_and_buckets():
    m = ServeMetrics("llama2-tiny")
    one_request(m, "llama2-tiny:a")
    got = families(m.render(ENGINE_SNAPSHOT))
    assert set(VLLM_SERIES) <= set(got), set(VLLM_SERIES) - set(got)
    assert {s.labels["model_name"] for n in VLLM_SERIES for s in got[n].samples} <= {"llama2-tiny", "llama2-tiny:a"}
    assert value(got, "vllm:generation_tokens_total", "llama2-tiny:a") == 4 and value(got, "vllm:prompt_tokens_total", "llama2-tiny:a") == 12
    assert value(got, "vllm:inter_token_latency_seconds_count", "llama2-tiny:a") == 3
    assert value(got, "vllm:request_success_total", "llama2-tiny:a", finished_reason="length") == 1
    # as vLLM does, every series exists at 0 for the engine's model from the start
    assert value(got, "vllm:request_success_total", "llama2-tiny", finished_reason="abort") == 0
    assert value(got, "vllm:time_to_first_token_seconds_count", "llama2-tiny") == 0
    les = [float(s.labels["le"]) for s in got["vllm:time_to_first_token_seconds"].samples
           if s.name.endswith("_bucket") and s.labels["model_name"] == "llama2-tiny"]
    assert les[:-1] == list(TTFT_BUCKETS)
    gauges = {n: got[f"vllm:{n}"].samples[0] for n in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}
    assert {n: s.value for n, s in gauges.items()} == ENGINE_SNAPSHOT["stats"]
    assert all(s.labels == {"model_name": "llama2-tiny"} for s in gauges.values())  # the engine's served name


def test_every_other_series_is_platform_prefixed():
    m = ServeMetrics("llama2-tiny")
    one_request(m, "llama2-tiny")
    names = {f.name for f in text_string_to_metric_families(m.render(ENGINE_SNAPSHOT).decode())}
    assert not any(n.startswith("llm_") for n in names)
    assert all(n.startswith(("vllm:", "platform_")) for n in names), names
    assert {"platform_requests", "platform_auth_failures", "platform_requests_rejected", "platform_registry_lookups",
            "platform_adapter_loads", "platform_adapter_evictions"} <= names


def test_engine_vllm_series_are_vllms_own_not_the_ingress():
    """With engine vllm the ingress records no vllm:* itself; what vLLM's registry holds is shown."""
    vllm_registry = CollectorRegistry()  # shaped like vLLM's PrometheusStatLogger's families
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_running", "", labels, registry=vllm_registry).labels("llama2-7b", "0").set(5)
    Gauge("vllm:num_requests_waiting", "", labels, registry=vllm_registry).labels("llama2-7b", "0").set(1)
    Gauge("vllm:kv_cache_usage_perc", "", labels, registry=vllm_registry).labels("llama2-7b", "0").set(0.5)
    Counter("vllm:prompt_tokens", "", labels, registry=vllm_registry).labels("llama2-7b", "0").inc(7)
    Histogram("vllm:time_to_first_token_seconds", "", labels, registry=vllm_registry).labels("llama2-7b", "0").observe(0.1)
    Counter("not_vllm", "", registry=vllm_registry).inc()
    assert vllm_stats(vllm_registry) == {"num_requests_running": 5, "num_requests_waiting": 1, "kv_cache_usage_perc": 0.5}
    exposition = vllm_exposition(vllm_registry)
    assert "not_vllm" not in exposition
    m = ServeMetrics("llama2-7b", engine_publishes_vllm=True)
    one_request(m, "llama2-7b")  # the request path records only platform series
    text = m.render({"stats": vllm_stats(vllm_registry), "exposition": exposition}).decode()
    got = families(text)
    ttft = [s for s in got["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert len(ttft) == 1 and ttft[0].value == 1 and ttft[0].labels == {"model_name": "llama2-7b", "engine": "0"}  # vLLM's one
    assert value(got, "vllm:prompt_tokens_total", "llama2-7b") == 7
    assert value(got, "platform_requests_total", "llama2-7b", status="200") == 1


def test_labels_stay_bounded_whatever_clients_send():
    """Unknown model names all count as "unknown"; auth failures by reason only, never by key."""
    m = ServeMetrics("llama2-tiny")
    for i in range(200):
        m.requests.labels(m.label(None), "chat", "404").inc()  # what the ingress does for unserved names
        m.auth_failures.labels("invalid_key").inc()
    values = {v for f in families(m.render()).values() for s in f.samples for k, v in s.labels.items() if k != "le"}
    assert values <= {"unknown", "chat", "404", "invalid_key", "missing_key", "queue_full", "ok", "failed",  # bounded sets
                      "llama2-tiny", "stop", "length", "abort"}  # the engine's model, vLLM's finish reasons


def test_registry_lookups_are_counted_by_result():
    m = ServeMetrics("llama2-tiny")

    def resolve(ref: str):
        if "ghost" in ref:
            raise LookupError(ref)
        return ref

    counted = counted_lookups(resolve, m.registry_lookups)
    counted("models:/bot@production")
    for i in range(3):
        try:
            counted(f"models:/ghost{i}@production")
        except LookupError:
            pass
    got = {s.labels["result"]: s.value for s in families(m.render())["platform_registry_lookups"].samples if s.name.endswith("_total")}
    assert got == {"ok": 1, "failed": 3}


def test_a_request_ended_without_its_finish_event_counts_as_abort():
    m = ServeMetrics("llama2-tiny")
    m.first_token("llama2-tiny", 0.05, prompt_tokens=3)
    m.aborted("llama2-tiny")  # what the ingress does when the client goes away mid-stream
    got = families(m.render())
    assert value(got, "vllm:request_success_total", "llama2-tiny", finished_reason="abort") == 1
    assert value(got, "vllm:e2e_request_latency_seconds_count", "llama2-tiny") == 0
