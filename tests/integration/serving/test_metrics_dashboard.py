"""/metrics of a real hf-engine deployment (the shared `tiny_app`) in vLLM's names, and the shipped
Grafana dashboard checked against it: every metric name any dashboard query references is a series
this deployment exports. Also: the engine's gauges move under load, and labels stay bounded however
many unknown model names and wrong keys clients send."""

from __future__ import annotations

import json
import re
import secrets
import threading
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmplatform.serving.metrics import VLLM_SERIES

REPO = Path(__file__).resolve().parents[3]
DASHBOARDS = sorted((REPO / "manifests" / "monitoring" / "dashboards").glob("*.json"))
BASE = "llama2-tiny-random"  # as in conftest.py
USER = [{"role": "user", "content": "Tell me about the sea."}]

# ---------------------------------------------------------------------------- PromQL -> metric names

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL (or Grafana `label_values(metric, label)`) expression reads: identifiers
    that are not functions, keywords, label names, string contents, ranges or Grafana variables."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings (label values, regexes)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # grouping labels
    s = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)", r" \1 ", s)
    s = re.sub(r"\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?", " ", s)  # Grafana variables outside matchers
    s = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:ms|[smhdwy])?(?![\w:])", " ", s)  # numbers, durations (offset 5m)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        following = s[m.end():].lstrip()[:1]
        if following != "(" and m.group(0).lower() not in PROMQL_WORDS:
            names.add(m.group(0))
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def test_the_promql_reader_finds_metrics_and_only_metrics():
    expr = ('histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:e2e_request_latency_seconds_bucket'
            '{model_name=~"$model_name", x="a:b"}[$__rate_interval]))) / on (model_name) group_left sum(up offset 5m)')
    assert promql_metric_names(expr) == {"vllm:e2e_request_latency_seconds_bucket", "up"}
    assert promql_metric_names("label_values(vllm:request_success_total, model_name)") == {"vllm:request_success_total"}


# ---------------------------------------------------------------------------- against the real deployment

def scrape(app: dict) -> tuple[str, dict]:
    text = httpx.get(app["url"].removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {app['key']}"}, timeout=30).text
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def sample_names(families: dict) -> set[str]:
    return {s.name for f in families.values() for s in f.samples}


@pytest.fixture(scope="module")
def exported(tiny_app) -> dict:
    """A few real requests (chat, streamed completion, base and adapter), then the scrape. While a
    long stream is decoding, one more scrape: the engine's gauges must show it."""
    client = openai.OpenAI(base_url=tiny_app["url"], api_key=tiny_app["key"], max_retries=0, timeout=60)
    client.chat.completions.create(model=BASE, messages=USER, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    for chunk in client.completions.create(model=f"{BASE}:a", prompt="The sea", max_tokens=8, stream=True, temperature=0):
        pass
    stream = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=300, stream=True, temperature=0,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # decoding now
    _, during = scrape(tiny_app)
    rest = threading.Thread(target=lambda: [c for c in chunks])
    rest.start()
    rest.join(120)
    text, families = scrape(tiny_app)
    return {"text": text, "families": families, "during": during}


@pytest.mark.integration
def test_every_vllm_series_is_exported_with_served_model_names(exported, tiny_app):
    fams = exported["families"]
    missing = [n for n in VLLM_SERIES if n not in fams]
    assert not missing, f"/metrics lacks {missing}"
    served = {m["id"] for m in httpx.get(tiny_app["url"] + "/models", headers={"Authorization": f"Bearer {tiny_app['key']}"}).json()["data"]}
    labels = {s.labels["model_name"] for n in VLLM_SERIES for s in fams[n].samples}
    assert labels and labels <= served, labels - served
    assert {BASE, f"{BASE}:a"} <= labels
    finished = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples if s.name.endswith("_total")}
    assert "length" in finished
    queue = [s.value for s in fams["vllm:request_queue_time_seconds"].samples if s.name.endswith("_count")]
    assert sum(queue) >= 3  # the engine reports each request's wait for a batch slot
    assert not [f for f in fams if f.startswith("llm_")]


@pytest.mark.integration
def test_engine_gauges_show_a_decoding_request(exported):
    during = {n: sum(s.value for s in exported["during"][f"vllm:{n}"].samples)
              for n in ("num_requests_running", "kv_cache_usage_perc")}
    assert during["num_requests_running"] >= 1 and 0 < during["kv_cache_usage_perc"] <= 1, during
    after = sum(s.value for s in exported["families"]["vllm:num_requests_running"].samples)
    assert after == 0


@pytest.mark.integration
@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_every_dashboard_query_reads_series_the_deployment_exports(path, exported):
    dashboard = json.loads(path.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    have = sample_names(exported["families"])
    for expr in queries:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= have, f"{path.name}: {expr!r} reads {sorted(names - have)}, which this deployment does not export"


@pytest.mark.integration
def test_unknown_models_and_wrong_keys_add_no_label_values(tiny_app, exported):
    """60 distinct unknown model names (20 of them registry references) and 60 distinct wrong keys:
    no new label value, no name or key text in /metrics."""
    url = tiny_app["url"]

    def label_sets(fams: dict) -> set:
        return {(s.name, tuple(sorted(s.labels.items()))) for f in fams.values() for s in f.samples}

    before = label_sets(scrape(tiny_app)[1])
    names = [f"ghost-{secrets.token_hex(4)}" for _ in range(40)] + [f"ghost{secrets.token_hex(4)}@production" for _ in range(20)]
    keys = [f"sk-{secrets.token_hex(12)}" for _ in range(60)]
    with httpx.Client(timeout=60) as c:
        for name in names:
            r = c.post(url + "/chat/completions", headers={"Authorization": f"Bearer {tiny_app['key']}"},
                       json={"model": name, "messages": USER, "max_tokens": 2})
            assert r.status_code == 404
        for key in keys:
            r = c.post(url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": BASE, "messages": USER, "max_tokens": 2})
            assert r.status_code == 401
    text, fams = scrape(tiny_app)
    new = label_sets(fams) - before
    assert not any(n in text for n in names) and not any(k in text for k in keys)
    assert {v for _, labels in new for _, v in labels} <= {"unknown", "chat", "401", "404"}, new  # at most these series
    assert len(new) <= 4, new  # platform_requests_total and _created for (unknown, 401) and (unknown, 404)
