"""Topology `colocated`: the engine runs inside the ingress replica (one Ray hop less per
streamed token). Same API: streaming, adapters, status; one deployment instead of two."""

from __future__ import annotations

import openai
import pytest

from conftest import BASE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def colocated(serving_env, adapter_dirs):
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app

    spec = {"name": "tiny-colocated", "engine": "hf", "topology": "colocated", "max_model_len": 512, "route_prefix": "/colocated",
            "model": {"base": BASE, "adapters": [{"name": "a", "source": str(adapter_dirs["a"])}], "allow_dynamic_adapters": False}}
    status = deploy_spec(spec, serving_env["ray_address"])
    yield status, openai.OpenAI(base_url=status["url"], api_key="none", max_retries=0, timeout=60)
    app.delete("tiny-colocated")


def test_one_deployment_holds_the_engine(colocated):
    status, _ = colocated
    assert set(status["deployments"]) == {"ingress"} and status["deployments"]["ingress"]["replicas"].get("RUNNING") == 1
    assert status["engine"]["engine"] == "hf" and status["engine"]["topology"] == "colocated"


def test_streams_base_and_adapter_requests_with_exact_counts(colocated):
    _, client = colocated
    for model in (BASE, "a"):
        pieces, usage = [], None
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to five"}], max_tokens=12,
                                                    temperature=0, stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert usage.completion_tokens == 12 and "".join(pieces)
    assert "a" in client.models.list().model_dump_json()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_metrics_show_the_in_replica_engine(colocated):
    """/metrics reads the engine in this replica: its gauges and vLLM-named series, adapter loads."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from llmplatform.serving.metrics import VLLM_SERIES

    status, _ = colocated
    text = httpx.get(status["url"].removesuffix("/v1") + "/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(VLLM_SERIES) <= set(fams)
    assert [s.value for s in fams["vllm:num_requests_running"].samples] == [0]  # idle after the tests above
    assert sum(s.value for s in fams["platform_adapter_loads"].samples) >= 1  # adapter `a` was loaded for a request
    assert sum(s.value for s in fams["platform_engine_metrics_errors"].samples if s.name.endswith("_total")) == 0
