"""The operator's /metrics (what manifests/monitoring's `llm-operator` PodMonitor scrapes): real HTTP,
registry lookups counted by result only (never by reference: a bounded label)."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from llmoperator.__main__ import serve_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_operator_metrics_count_registry_lookups_by_result():
    def lookup(ref: str, tracking_uri: str | None) -> dict:
        if "ghost" in ref:
            raise LookupError(ref)
        return {"version": 3}

    port = free_port()
    counted, server = serve_metrics(port, "127.0.0.1", CollectorRegistry(), lookup)
    try:
        assert counted("models:/bot@production", None) == {"version": 3}
        for i in range(5):
            with pytest.raises(LookupError):
                counted(f"models:/ghost{i}@production", None)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    samples = {(s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("platform_registry_lookups_total", (("result", "ok"),))] == 1
    assert samples[("platform_registry_lookups_total", (("result", "failed"),))] == 5
    assert "ghost" not in text
