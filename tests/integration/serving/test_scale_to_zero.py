"""Scale to zero: with `min_replicas: 0` an idle deployment's engine goes to 0 replicas after
`downscale_to_zero_delay_s`; status and /metrics then answer without starting one; the next request
is held (not refused) until a replica is up, and `serve status` reports that cold start."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from conftest import BASE

pytestmark = pytest.mark.integration
NAME = "tiny-zero"


def engine_replicas(name: str) -> int:
    """Engine replicas in any state (starting, running, stopping)."""
    from ray import serve

    app = serve.status().applications[name]
    return sum(app.deployments["engine"].replica_states.values())


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(1)


def test_idle_goes_to_zero_and_the_next_request_waits_for_a_cold_start(serving_env, capsys):
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app

    spec = {"name": NAME, "engine": "hf", "max_model_len": 128, "route_prefix": "/zero",
            "model": {"base": BASE, "allow_dynamic_adapters": False}, "resources": {"cpus_per_shard": 0.5},
            "autoscaling": {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 1, "downscale_to_zero_delay_s": 4},
            "limits": {"request_timeout_s": 240}}
    status = deploy_spec(spec, serving_env["ray_address"])
    client = openai.OpenAI(base_url=status["url"], api_key="none", max_retries=0, timeout=240)
    try:
        assert client.completions.create(model=BASE, prompt="Hello", max_tokens=2).choices[0].text is not None
        assert app.status(NAME)["cold_starts"] == 0  # the deploy started that replica, no request waited for it

        wait_for(lambda: engine_replicas(NAME) == 0, 120, "the idle engine to scale to zero")
        assert httpx.get(status["url"].removesuffix("/v1") + "/metrics", timeout=30).status_code == 200
        at_zero = app.status(NAME)
        assert at_zero["engine"] == {"replicas": 0} and at_zero["last_cold_start"] is None
        time.sleep(5)
        assert engine_replicas(NAME) == 0  # neither the scrape nor the status woke it

        sent = time.time()
        out = client.completions.create(model=BASE, prompt="Hello", max_tokens=2)
        took = time.time() - sent
        assert out.choices[0].text is not None and out.usage.completion_tokens == 2

        after = app.status(NAME)
        cold = after["last_cold_start"]
        assert after["cold_starts"] == 1 and cold["at"] >= sent
        assert 0 < cold["replica_start_s"] < cold["waited_s"] <= took + 1  # the wait covered the replica's start

        from llmplatform.cli.main import main

        capsys.readouterr()
        assert main(["serve", "status", NAME]) == 0
        table = capsys.readouterr().out
        assert "COLD START" in table and f"{cold['waited_s']:.1f}s at " in table
        with capsys.disabled():
            print(f"\ncold start: the request waited {cold['waited_s']} s, the replica's own start took {cold['replica_start_s']} s")
    finally:
        app.delete(NAME)
