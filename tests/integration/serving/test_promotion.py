"""A promotion under continuous load: zero failed requests, answers switch to the new version."""

from __future__ import annotations

import threading
import time

import openai
import pytest

pytestmark = pytest.mark.integration
REGISTERED = "support-bot"  # as in conftest.py
PROMPT = [{"role": "user", "content": "Which version are you?"}]
LOAD_CAP_S = 40.0  # hard bound on the whole load phase


def test_promotion_under_load_switches_without_failures(tiny_app, registry_versions, serving_env):
    from llmplatform import registry
    from llmplatform.serving import app

    client = openai.OpenAI(base_url=tiny_app["url"], api_key=tiny_app["key"], max_retries=0, timeout=60)

    def ask(model: str) -> str:
        r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    v1, v2 = registry_versions["v1"], registry_versions["v2"]
    want = {v1: ask(f"{REGISTERED}/{v1}"), v2: ask(f"{REGISTERED}/{v2}")}
    assert want[v1] != want[v2]
    replica_before = app.status("tiny-chat", tiny_app["key"])["engine"]["replica"]

    results: list[tuple[float, float, str | None, str | None]] = []  # (start, end, text, error)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            t0 = time.time()
            try:
                results.append((t0, time.time(), ask(f"{REGISTERED}@production"), None))
            except Exception as exc:  # any failure is a test failure, recorded for the message
                results.append((t0, time.time(), None, f"{type(exc).__name__}: {exc}"))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    started = time.time()
    time.sleep(2.0)
    promoted_at = time.time()
    registry.promote(serving_env["mlflow"], REGISTERED, v2, "production")
    try:
        while time.time() - started < LOAD_CAP_S:
            switched = [r[1] for r in results if r[2] == want[v2]]
            # enough requests that *started* after the switch was visible (the `late` check below)
            if switched and len([r for r in results if r[0] > min(switched) + 0.5]) >= 8:
                break
            time.sleep(0.25)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        registry.promote(serving_env["mlflow"], REGISTERED, v1, "production")  # leave the session as it was

    errors = [r[3] for r in results if r[3]]
    assert not errors, errors[:3]
    assert len(results) >= 16
    before = [r[2] for r in results if r[1] < promoted_at]
    assert before and all(t == want[v1] for t in before)
    assert set(r[2] for r in results) <= {want[v1], want[v2]}
    first_new = min(r[1] for r in results if r[2] == want[v2])
    assert first_new - promoted_at < tiny_app["spec"]["registry_poll_s"] + 10, "promotion took too long to be served"
    late = [r[2] for r in results if r[0] > first_new + 0.5]  # started after the switch was visible
    assert late and all(t == want[v2] for t in late)
    status = app.status("tiny-chat", tiny_app["key"])
    assert status["engine"]["replica"] == replica_before, "the engine replica was restarted"
    assert any(p["to"] == v2 for p in status["promotions"])
