"""`limits.request_timeout_s` ends a request that runs too long with OpenAI's error JSON (504),
streaming or not, instead of holding the connection."""

from __future__ import annotations

import time

import openai
import pytest

from conftest import BASE

pytestmark = pytest.mark.integration
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def short_app(serving_env):
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app

    spec = {"name": "tiny-deadline", "engine": "hf", "max_model_len": 512, "route_prefix": "/deadline",
            "model": {"base": BASE, "allow_dynamic_adapters": False},
            "limits": {"request_timeout_s": TIMEOUT_S, "max_batch_size": 4}}
    status = deploy_spec(spec, serving_env["ray_address"])
    yield openai.OpenAI(base_url=status["url"], api_key="none", max_retries=0, timeout=60)
    app.delete("tiny-deadline")


def long_request(client, stream: bool):
    return client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=480, temperature=0, stream=stream,
                                     extra_body={"ignore_eos": True})


def test_a_request_past_the_deadline_gets_504_not_a_hang(short_app):
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        long_request(short_app, stream=False)
    assert err.value.status_code == 504 and f"request_timeout_s ({TIMEOUT_S:g} s)" in str(err.value)
    assert time.monotonic() - t0 < TIMEOUT_S + 10


def test_a_stream_past_the_deadline_ends_with_an_error_event(short_app):
    t0 = time.monotonic()
    texts = []
    with pytest.raises(openai.APIError) as err:  # the 504 before the first token, or the error event in the stream
        for chunk in long_request(short_app, stream=True):
            texts.append(chunk.choices[0].text if chunk.choices else "")
    assert "request_timeout_s" in str(err.value)
    assert time.monotonic() - t0 < TIMEOUT_S + 10
    # the deployment still answers a request that fits the deadline
    ok = short_app.completions.create(model=BASE, prompt="Hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1
