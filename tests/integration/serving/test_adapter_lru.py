"""Many adapters per deployment: `max_loaded_adapters` bounds each replica with LRU eviction, an
evicted adapter is reloaded transparently, and with two replicas requests for an adapter go to
the replica that already holds it (Serve multiplexing), so loads stay near the adapters asked for."""

from __future__ import annotations

import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import BASE

pytestmark = pytest.mark.integration


def deploy(serving_env, adapter_dirs, tmp_path_factory, name: str, adapters: int, replicas: int) -> dict:
    from llmplatform.backends.serving import deploy_spec

    root = tmp_path_factory.mktemp(name)
    sources = [shutil.copytree(adapter_dirs["a"], root / f"ad{i}") for i in range(adapters)]  # distinct ids, one weight set
    spec = {"name": name, "engine": "hf", "max_model_len": 128, "route_prefix": f"/{name}", "max_loaded_adapters": 4,
            "model": {"base": BASE, "adapters": [{"name": f"ad{i}", "source": str(s)} for i, s in enumerate(sources)],
                      "allow_dynamic_adapters": False},
            "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
            "resources": {"cpus_per_shard": 0.5}, "limits": {"max_batch_size": 8, "request_timeout_s": 120}}
    return deploy_spec(spec, serving_env["ray_address"])


def random_traffic(url: str, adapters: int, requests: int, concurrency: int, seed: int) -> list[str]:
    """`requests` short completions, each for a random adapter; returns the failures."""
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    rng = random.Random(seed)
    picks = [f"ad{rng.randrange(adapters)}" for _ in range(requests)]

    def one(model: str) -> str | None:
        try:
            out = client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
            return None if out.choices[0].text is not None else f"{model}: empty"
        except Exception as exc:  # every failure is reported, not only the first
            return f"{model}: {exc!r}"

    with ThreadPoolExecutor(concurrency) as pool:
        return [f for f in pool.map(one, picks) if f]


def engine_counts(app_name: str, replicas: int) -> dict[str, dict]:
    """Each engine replica's metrics snapshot (adapter loads/evictions), by replica id."""
    from ray import serve

    handle = serve.get_deployment_handle("engine", app_name=app_name)
    seen: dict[str, dict] = {}
    deadline = time.time() + 60
    while len(seen) < replicas and time.time() < deadline:
        snap = handle.metrics.remote().result(timeout_s=30)
        seen[snap["replica"]] = snap
    assert len(seen) == replicas, f"reached {len(seen)} of {replicas} engine replicas"
    return seen


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("platform_adapter")}


def test_sixteen_adapters_on_four_slots_evict_and_reload_without_a_failed_request(serving_env, adapter_dirs, tmp_path_factory):
    from llmplatform.serving import app

    status = deploy(serving_env, adapter_dirs, tmp_path_factory, "lru-one", adapters=16, replicas=1)
    try:
        failures = random_traffic(status["url"], 16, requests=64, concurrency=6, seed=18)
        assert failures == []
        counts = scrape(status["url"])
        held = engine_counts("lru-one", 1).popitem()[1]
        assert counts["platform_adapter_loads"] == held["adapter_loads"] > 16  # evicted adapters came back
        assert counts["platform_adapter_evictions"] == held["adapter_evictions"]
        # every load but the (at most 4) still held was evicted, each exactly once, and the engine let go of it
        info = app.status("lru-one")["engine"]
        assert len(info["adapters_loaded"]) <= 4
        assert held["adapter_evictions"] == held["adapter_loads"] - len(info["adapters_loaded"])
    finally:
        app.delete("lru-one")


def test_two_replicas_route_each_adapter_to_the_replica_holding_it(serving_env, adapter_dirs, tmp_path_factory):
    from llmplatform.serving import app

    distinct = 6  # fits the two replicas' 2 x 4 slots: with affinity nothing needs evicting
    status = deploy(serving_env, adapter_dirs, tmp_path_factory, "lru-two", adapters=distinct, replicas=2)
    try:
        failures = random_traffic(status["url"], distinct, requests=60, concurrency=4, seed=7)
        assert failures == []
        per_replica = engine_counts("lru-two", 2)
        loads = sum(s["adapter_loads"] for s in per_replica.values())
        assert distinct <= loads <= 1.5 * distinct, {r: s["adapter_loads"] for r, s in per_replica.items()}
    finally:
        app.delete("lru-two")
