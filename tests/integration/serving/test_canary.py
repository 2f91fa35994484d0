"""Adapter canaries on the shared deployment (`tiny_app`), under continuous load, over real HTTP.

A fresh registered model `canary-bot-<id>` gets v1 (production), v2, and v3, an adapter that
registers fine but makes the engine replica raise for its requests (lora_dropout 1.5: peft
refuses it when loading). The deployment follows `canary-bot-<id>@production` dynamically.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import openai
import pytest

from conftest import BASE

pytestmark = pytest.mark.integration
PROMPT = [{"role": "user", "content": "Hi"}]
POLL_WAIT_S = 20.0  # the app polls every second; this bounds waiting for a step to be served


@pytest.fixture(scope="module")
def bot(serving_env, adapter_dirs, base_dir, tmp_path_factory, lora_factory):
    from mlflow import MlflowClient

    from llmplatform import registry

    uri, name = serving_env["mlflow"], f"canary-bot-{uuid.uuid4().hex[:6]}"
    bad = lora_factory(base_dir, tmp_path_factory.mktemp("faulty") / "bad", 9)  # the fixture: a lazy `from conftest import` finds whichever conftest was imported last
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_dropout": 1.5}))  # the injected fault
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment(f"canary-tests-{uuid.uuid4().hex[:6]}")).info.run_id
    lineage = {"base_model": BASE}
    v = [registry.register_adapter(uri, name, d, run, lineage, base_model_dir=base_dir)
         for d in (adapter_dirs["v1"], adapter_dirs["v2"], bad)]
    registry.promote(uri, name, v[0], "production")
    return {"uri": uri, "name": name, "v1": v[0], "v2": v[1], "bad": v[2]}


class Load:
    """Background requests for `model` on `threads` threads, each with a fresh `user`; records every answer."""

    def __init__(self, client, model: str, threads: int = 4):
        self.client, self.model, self.results, self.stop = client, model, [], threading.Event()
        self.count = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stop.is_set():
            self.count += 1
            user, t0 = f"user-{uuid.uuid4().hex}", time.time()
            try:
                raw = self.client.chat.completions.with_raw_response.create(model=self.model, messages=PROMPT, max_tokens=1,
                                                                            user=user)
                r = raw.parse()
                self.results.append((t0, time.time(), r.model, raw.headers.get("x-platform-model-version"), None))
            except Exception as exc:  # every failure is recorded for the assertion message
                self.results.append((t0, time.time(), None, None, f"{type(exc).__name__}: {exc}"))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def since(self, t: float) -> list[tuple]:
        return [r for r in self.results if r[0] >= t]


def wait_for(cond, what: str, timeout: float = POLL_WAIT_S) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return time.time()
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def deployment(tiny_app) -> dict:
    from llmplatform.serving import app

    return app.status("tiny-chat", tiny_app["key"])


def test_canary_split_sticky_users_and_steps_without_failures(tiny_app, bot):
    from llmplatform.registry import canary

    client = openai.OpenAI(base_url=tiny_app["url"], api_key=tiny_app["key"], max_retries=0, timeout=60)
    model, ref = f"{bot['name']}@production", f"models:/{bot['name']}@production"
    v1, v2 = f"{bot['name']}/{bot['v1']}", f"{bot['name']}/{bot['v2']}"
    first = client.chat.completions.with_raw_response.create(model=model, messages=PROMPT, max_tokens=1)
    assert first.parse().model == v1 and first.headers["x-platform-model-version"] == str(bot["v1"])

    def canary_weight():
        return (deployment(tiny_app).get("canaries") or {}).get(ref, {}).get("weight")

    with Load(client, model) as load:
        canary.start(bot["uri"], bot["name"], bot["v2"], "production", 10)
        seen10 = wait_for(lambda: canary_weight() == 10, "the 10% canary served")
        wait_for(lambda: len(load.since(seen10)) >= 400, ">= 400 requests at 10%", timeout=600)
        at10 = load.since(seen10)
        sticky = {client.chat.completions.create(model=model, messages=PROMPT, max_tokens=1, user="alice").model
                  for _ in range(12)}
        canary.set_weight(bot["uri"], bot["name"], "production", 50)
        seen50 = wait_for(lambda: canary_weight() == 50, "the 50% canary served")
        wait_for(lambda: len(load.since(seen50)) >= 60, "requests at 50%", timeout=300)
        canary.complete(bot["uri"], bot["name"], "production", bot["v2"])
        done = wait_for(lambda: canary_weight() is None and deployment(tiny_app)["served_versions"].get(ref) == bot["v2"],
                        "the completed canary served")
        wait_for(lambda: len(load.since(done + 0.5)) >= 20, "requests after completing", timeout=300)
        second = time.time()
        canary.start(bot["uri"], bot["name"], bot["v1"], "production", 30)  # then abort it (what rollback does)
        wait_for(lambda: canary_weight() == 30, "a second canary served")
        canary.abort(bot["uri"], bot["name"], "production", reason="test abort")
        aborted = wait_for(lambda: canary_weight() is None, "the aborted canary gone")
        wait_for(lambda: len(load.since(aborted + 0.5)) >= 20, "requests after aborting", timeout=300)

    errors = [r[4] for r in load.results if r[4]]
    assert not errors, errors[:3]  # start, raise, complete and abort cost no request
    share = sum(r[2] == v2 for r in at10) / len(at10)
    assert abs(share - 0.10) <= 0.05, f"v2 answered {share:.1%} of {len(at10)} requests at weight 10%"
    assert all(r[3] == r[2].rsplit("/", 1)[1] for r in load.results)  # header and model field agree
    assert len(sticky) == 1, sticky
    assert {r[2] for r in load.since(seen50)} >= {v1, v2}
    assert all(r[2] == v2 for r in load.since(done + 0.5) if r[1] < second)  # completed: all on v2
    assert all(r[2] == v2 for r in load.since(aborted + 0.5))
    stats = deployment(tiny_app)["versions"]
    assert stats[v2]["requests"] > 0 and stats[v2]["errors"] == 0 and stats[v2]["ttft_p95_s"] > 0 and stats[v2]["tokens"] > 0


def test_guard_aborts_a_failing_canary_within_the_window_and_history_says_why(tiny_app, bot):
    from llmplatform.registry import canary, canary_rules, show_model

    client = openai.OpenAI(base_url=tiny_app["url"], api_key=tiny_app["key"], max_retries=0, timeout=60)
    model, ref = f"{bot['name']}@production", f"models:/{bot['name']}@production"
    holder = show_model(bot["uri"], bot["name"])["aliases"]["production"]
    guard = canary_rules.parse_guard(["error_rate>0.02"], "20s", None)
    with Load(client, model, threads=2) as load:
        started = time.time()
        canary.start(bot["uri"], bot["name"], bot["bad"], "production", 50, guard)
        try:
            wait_for(lambda: canary.state_of(bot["uri"], bot["name"], "production") is None, "the guard's abort",
                     timeout=guard.window_s + 10)
        except AssertionError as exc:
            status = deployment(tiny_app)
            raise AssertionError(f"{exc}; answers: {[r[2] or r[4][:200] for r in load.results[-6:]]}; "
                                 f"versions: {status.get('versions')}; events: {status.get('canary_events')}") from None
        aborted = time.time()
        gone = wait_for(lambda: ref not in (deployment(tiny_app).get("canaries") or {}), "the split dropped")
        wait_for(lambda: len(load.since(gone + 0.5)) >= 10, "requests after the abort", timeout=120)
    assert aborted - started <= guard.window_s + 5
    failed = [r for r in load.results if r[4]]
    assert failed and all("cannot be loaded" in r[4] for r in failed), failed[:3]  # the faulty version's requests
    assert all(r[4] is None and r[2] == f"{bot['name']}/{holder}" for r in load.since(gone + 0.5))
    last = show_model(bot["uri"], bot["name"])["history"][-1]
    assert last["kind"] == "canary-abort" and last["actor"] == "guard@tiny-chat"
    assert last["reason"].startswith("guard: error_rate>0.02: candidate error_rate=")
    assert (last["from_version"], last["to_version"]) == (bot["bad"], holder)
    assert any(e["action"] == "abort" for e in deployment(tiny_app)["canary_events"])


def test_promote_after_completes_a_canary_whose_guard_held(tiny_app, bot):
    """`--promote-after`: the deployment's guard completes a healthy canary by itself once the time
    has passed, moving the alias, and every request keeps succeeding across the switch."""
    from llmplatform.registry import canary, canary_rules, show_model

    client = openai.OpenAI(base_url=tiny_app["url"], api_key=tiny_app["key"], max_retries=0, timeout=60)
    ref = f"models:/{bot['name']}@production"
    holder = show_model(bot["uri"], bot["name"])["aliases"]["production"]
    candidate = bot["v1"] if holder != bot["v1"] else bot["v2"]
    guard = canary_rules.parse_guard(["error_rate>0.02"], "5s", "8s")
    with Load(client, f"{bot['name']}@production", threads=2) as load:
        started = time.time()
        canary.start(bot["uri"], bot["name"], candidate, "production", 50, guard)
        completed = wait_for(lambda: canary.state_of(bot["uri"], bot["name"], "production") is None, "the promote-after completion",
                             timeout=guard.promote_after_s + 15)
        served = wait_for(lambda: deployment(tiny_app)["served_versions"].get(ref) == candidate, "the new holder served")
        wait_for(lambda: len(load.since(served + 0.5)) >= 10, "requests after completing", timeout=120)
    assert completed - started >= guard.promote_after_s  # not before the time
    assert not [r for r in load.results if r[4]], [r[4] for r in load.results if r[4]][:3]
    assert all(r[2] == f"{bot['name']}/{candidate}" for r in load.since(served + 0.5))
    model = show_model(bot["uri"], bot["name"])
    last = model["history"][-1]
    assert model["aliases"]["production"] == candidate
    assert (last["kind"], last["actor"], last["from_version"], last["to_version"]) == ("promote", "guard@tiny-chat", holder, candidate)
    assert "promote-after" in last["reason"]
