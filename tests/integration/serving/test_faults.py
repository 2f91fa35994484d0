"""The endpoint under hostile input and injected faults, over real HTTP against real deployments:
a hung model registry, huge bodies, input that used to answer 500, generated bodies (hypothesis),
and an engine replica killed mid-stream. One module deployment (`tiny-faults`, auth on with public
metrics, its registry a local socket that accepts and never answers) serves every test here; the
killed-replica test runs last because it replaces the engine replica."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import threading
import time

import httpx
import pytest

from conftest import API_KEY, BASE

pytestmark = [pytest.mark.integration, pytest.mark.faults]
LOOKUP_TIMEOUT_S = 2.0
USER = [{"role": "user", "content": "Tell me about the sea."}]


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers: a hung registry."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture(scope="module")
def faults_app(serving_env, adapter_dirs, keys_file):
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app

    registry = SilentServer()
    spec = {"name": "tiny-faults", "engine": "hf", "max_model_len": 1024, "route_prefix": "/faults",
            "model": {"base": BASE, "adapters": [{"name": "a", "source": str(adapter_dirs["a"])}]},
            "tracking_uri": registry.url, "registry_poll_s": 1.0,
            "limits": {"request_timeout_s": 60, "registry_lookup_timeout_s": LOOKUP_TIMEOUT_S, "default_max_tokens": 8,
                       "max_request_bytes": 8 * 1024 * 1024},
            "auth": {"enabled": True, "api_keys_file": str(keys_file), "api_keys_env": None, "public_metrics": True}}
    try:
        status = deploy_spec(spec, serving_env["ray_address"])
        root = status["url"].removesuffix("/v1")
        with httpx.Client(base_url=root, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=90) as client:
            yield {"root": root, "client": client}
    finally:
        app.delete("tiny-faults")
        registry.close()


def openai_error(r: httpx.Response) -> dict:
    """The OpenAI error object of a 4xx/5xx answer (fails when the body has another shape)."""
    err = r.json()["error"]
    assert isinstance(err["message"], str) and isinstance(err["type"], str) and {"param", "code"} <= set(err), r.text[:300]
    return err


# ---------------------------------------------------------------------------- registry outage


def test_hung_registry_fails_new_names_fast_and_loaded_names_keep_serving(faults_app):
    root, auth = faults_app["root"], {"Authorization": f"Bearer {API_KEY}"}
    for model in (BASE, f"{BASE}:a"):  # warm: the first request to a fresh deployment is not what is measured
        assert faults_app["client"].post("/v1/chat/completions", json={"model": model, "messages": USER, "max_tokens": 2}).status_code == 200

    async def main():
        async with httpx.AsyncClient(base_url=root, headers=auth, timeout=60) as c:
            async def timed(model):
                t0 = time.monotonic()
                r = await c.post("/v1/chat/completions", json={"model": model, "messages": USER, "max_tokens": 4})
                return model, r, time.monotonic() - t0
            ghosts = [timed(f"ghost{i}@production") for i in range(6)]
            served = [timed(m) for m in (BASE, f"{BASE}:a") * 3]
            return await asyncio.gather(*ghosts, *served)

    results = asyncio.run(main())
    for model, r, took in results:
        if model.startswith("ghost"):
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, (model, r.status_code, r.text[:200])
            assert openai_error(r)["code"] == "registry_unavailable"
            assert took < LOOKUP_TIMEOUT_S + 3, (model, took)
        else:
            assert r.status_code == 200, (model, r.text[:200])
            assert took < LOOKUP_TIMEOUT_S + 3, (model, took)  # never waited behind the registry
    health = httpx.get(root + "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    ids = {m["id"] for m in faults_app["client"].get("/v1/models").json()["data"]}
    assert not any("ghost" in i for i in ids) and BASE in ids


def test_unknown_registry_names_are_forgotten_truncated_and_not_labelled(tiny_app):
    url, auth = tiny_app["url"], {"Authorization": f"Bearer {tiny_app['key']}"}
    names = [f"junk{i}@production" for i in range(5)] + [f"junk/{10_000 + i}" for i in range(5)] + ["j" * 100_000]
    for name in names:
        r = httpx.post(url + "/chat/completions", headers=auth, json={"model": name, "messages": USER, "max_tokens": 2}, timeout=60)
        assert r.status_code == 404, r.text[:300]
        assert len(openai_error(r)["message"]) < 1000
    ids = {m["id"] for m in httpx.get(url + "/models", headers=auth).json()["data"]}
    assert not any(i.startswith("junk") or i.startswith("jjj") for i in ids)
    deployment = httpx.get(url + "/deployment", headers=auth).json()
    assert not any("junk" in ref for ref in deployment["served_versions"])  # not followed: never polled
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics", headers=auth).text
    assert "junk" not in metrics and "jjjj" not in metrics and 'model_name="unknown"' in metrics
    assert len(metrics) < 100_000


# ---------------------------------------------------------------------------- body size, event loop


def test_a_body_over_the_limit_gets_413_at_once(tiny_app):
    """tiny_app keeps the default limits.max_request_bytes (1 MiB)."""
    url, auth = tiny_app["url"], {"Authorization": f"Bearer {tiny_app['key']}"}
    body = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x" * 5_000_000}]}).encode()
    t0 = time.monotonic()
    r = httpx.post(url + "/chat/completions", headers={**auth, "Content-Type": "application/json"}, content=body, timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 413 and openai_error(r)["code"] == "request_too_large" and "1048576" in r.json()["error"]["message"]
    assert took < 3, took

    def chunked():  # no Content-Length: refused while reading
        for i in range(0, len(body), 256 * 1024):
            yield body[i:i + 256 * 1024]
    r = httpx.post(url + "/chat/completions", headers={**auth, "Content-Type": "application/json"}, content=chunked(), timeout=60)
    assert r.status_code == 413 and openai_error(r)["code"] == "request_too_large"


def small_request_delay(root: str, auth: dict, big_path: str, big: bytes, seconds: float) -> tuple[float, list[float], list[float], set]:
    """(p50 delay, small-request latencies alone, latencies while a thread sends 5 MB bodies back to back
    for `seconds`, the big requests' statuses). The big sender is a thread with its own client, so the
    client's own event loop never waits on 5 MB writes."""
    small = {"model": BASE, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    codes: set[int] = set()

    def send_bigs(stop_at: float):
        with httpx.Client(base_url=root, headers={**auth, "Content-Type": "application/json"}, timeout=60) as c:
            while time.monotonic() < stop_at:  # one 5 MB request at a time, a quarter second apart
                codes.add(c.post(big_path, content=big).status_code)
                time.sleep(0.25)

    async def main():
        async with httpx.AsyncClient(base_url=root, headers=auth, timeout=60) as c:
            async def one_small():
                t0 = time.monotonic()
                r = await c.post("/v1/completions", json=small)
                assert r.status_code == 200, r.text[:200]
                return time.monotonic() - t0

            for _ in range(3):
                await one_small()  # warm up
            alone = [await one_small() for _ in range(15)]
            sender = threading.Thread(target=send_bigs, args=(time.monotonic() + seconds,))
            sender.start()
            during = []
            while sender.is_alive() and len(during) < 100:
                during.append(await one_small())
            sender.join()
            return alone, during

    alone, during = asyncio.run(main())
    return statistics.median(during) - statistics.median(alone), alone, during, codes


def report(what: str, delay: float, alone: list[float], during: list[float]) -> str:
    return (f"{what}: small request p50 alone {statistics.median(alone) * 1000:.0f} ms, during 5 MB requests "
            f"{statistics.median(during) * 1000:.0f} ms (n={len(during)}, max {max(during) * 1000:.0f} ms): delay {delay * 1000:.0f} ms")


def test_a_5mb_request_does_not_delay_a_concurrent_small_one(tiny_app):
    """With the default 1 MiB limit a 5 MB body is refused from its Content-Length, unread."""
    big = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "word " * 1_000_000}]}).encode()
    root = tiny_app["url"].removesuffix("/v1")
    delay, alone, during, codes = small_request_delay(root, {"Authorization": f"Bearer {tiny_app['key']}"},
                                                      "/v1/chat/completions", big, seconds=4)
    print(report("1 MiB limit", delay, alone, during))
    assert codes == {413}
    assert delay < 0.05, report("1 MiB limit", delay, alone, during)


def test_a_5mb_prompt_under_a_raised_limit_is_parsed_off_the_event_loop(faults_app):
    """The faults deployment allows 8 MiB: the 5 MB prompt is read, parsed on a worker thread and
    refused as too long for max_model_len without being tokenized; small requests keep flowing."""
    big = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "word " * 1_000_000}]}).encode()
    t0 = time.monotonic()
    r = faults_app["client"].post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    refused_in = time.monotonic() - t0
    assert r.status_code == 400 and openai_error(r)["code"] == "context_length_exceeded" and "at least" in r.json()["error"]["message"]
    delay, alone, during, codes = small_request_delay(faults_app["root"], {"Authorization": f"Bearer {API_KEY}"},
                                                      "/v1/chat/completions", big, seconds=4)
    print(f"5 MB prompt refused in {refused_in:.2f} s; " + report("8 MiB limit", delay, alone, during))
    assert codes == {400}
    assert refused_in < 5
    # the body crosses Ray's HTTP proxy into the replica (outside the ingress); bound the whole effect loosely
    assert delay < 0.5, report("8 MiB limit", delay, alone, during)


# ---------------------------------------------------------------------------- no 500 for user input


@pytest.mark.parametrize("path, body", [
    ("chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}),
    ("chat/completions", {"model": BASE, "messages": USER, "max_tokens": 2, "seed": 2**70}),
    ("completions", {"model": BASE, "prompt": [[]], "max_tokens": 2}),
    ("completions", {"model": "\ud800@x", "prompt": "hi", "max_tokens": 2}),
    ("completions", {"model": BASE, "prompt": [10**30], "max_tokens": 2}),
], ids=["lone-surrogate", "seed-2**70", "prompt-[[]]", "surrogate-model", "huge-token-id"])
def test_hostile_values_get_400_not_500(faults_app, path, body):
    r = faults_app["client"].post(f"/v1/{path}", content=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert openai_error(r)["type"] == "invalid_request_error"


def test_docs_and_openapi_need_the_key_and_metrics_follow_public_metrics(faults_app, tiny_app):
    root = faults_app["root"]
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(root + path).status_code == 401
        assert faults_app["client"].get(path).status_code == 200
    assert "/v1/chat/completions" in faults_app["client"].get("/openapi.json").json()["paths"]
    assert httpx.get(root + "/metrics").status_code == 200  # auth.public_metrics: true
    tiny_root = tiny_app["url"].removesuffix("/v1")
    assert httpx.get(tiny_root + "/metrics").status_code == 401  # the default: metrics need the key too


# ---------------------------------------------------------------------------- generated bodies (hypothesis)


def openai_bodies():
    """Request bodies built from the request schema: each field either a plausible value or junk
    (wrong types, huge numbers, odd unicode incl. lone surrogates, nested empties), fields dropped at
    random, and sometimes no object at all. `max_completion_tokens` stays 1..4 so that every
    valid request is short to generate (it wins over `max_tokens`, which is generated freely)."""
    from hypothesis import strategies as st

    from llmplatform.serving.openai_schema import ChatCompletionRequest, CompletionRequest

    odd = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12) | st.sampled_from(
        ["", "\ud800", "\udfff x", "\x00", "\u202e\u200b", "\U0001f999" * 20, "[INST]", "<s></s>", "a@b", "x/1", "{{ x }}"])
    huge = st.sampled_from([2**63, 2**64, 2**70, -(2**70), 10**400, 1e308, float("inf"), float("nan"), -0.0])
    scalar = st.none() | st.booleans() | st.integers() | huge | st.floats() | odd
    junk = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd, inner, max_size=3), max_leaves=6)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | junk,
                                     "content": odd | st.lists(st.fixed_dictionaries({"type": st.just("text") | junk, "text": odd | junk}),
                                                               max_size=2) | junk})
    plausible = {
        "model": st.sampled_from([BASE, "a", f"{BASE}:a", "tiny-chat", "support-bot@production", "nope@x", "nope/7"]),
        "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": odd}), min_size=1, max_size=2) | st.lists(message, max_size=3),
        "prompt": odd | st.lists(st.integers(-5, 2000), max_size=4) | st.lists(st.lists(st.integers(0, 999), max_size=3), max_size=2),
        "max_tokens": st.integers(-3, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "seed": st.integers(),
        "stop": odd | st.lists(odd, max_size=5), "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": junk}),
        "n": st.integers(0, 3), "echo": st.booleans(), "ignore_eos": st.booleans(), "user": odd,
    }
    fields = sorted(set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields) - {"max_completion_tokens"})

    def value(draw, f):  # one in five fields is junk
        return draw(junk if draw(st.integers(0, 4)) == 4 else plausible.get(f, junk))  # (hypothesis favours small draws)

    @st.composite
    def body(draw):
        if draw(st.integers(0, 19)) == 19:
            return draw(junk)  # not an object
        chosen = {"model", draw(st.sampled_from(["messages", "prompt"]))} | set(draw(st.lists(st.sampled_from(fields), max_size=5)))
        out = {f: value(draw, f) for f in sorted(chosen) if draw(st.integers(0, 9)) != 9}  # one in ten required fields is left out
        out["max_completion_tokens"] = draw(st.integers(1, 4))
        return out

    return st.tuples(st.sampled_from(["chat/completions", "completions"]), body())


def test_generated_bodies_never_get_a_5xx(tiny_app):
    """Every answer to a generated body is 2xx, or a 4xx in OpenAI's error shape (60 bodies, < 1 min)."""
    from hypothesis import HealthCheck, given, settings

    url, auth = tiny_app["url"], {"Authorization": f"Bearer {tiny_app['key']}", "Content-Type": "application/json"}
    seen: dict[int, int] = {}
    with httpx.Client(timeout=60) as client:
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(openai_bodies())
        def check(case):
            path, body = case
            raw = json.dumps(body).encode()  # NaN / Infinity / lone surrogates go out as JSON allows them
            with client.stream("POST", f"{url}/{path}", content=raw, headers=auth) as r:
                text = r.read().decode()
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, raw[:300], r.status_code, text[:300])
            if r.status_code >= 400:
                err = json.loads(text)["error"]
                assert r.status_code < 500 and isinstance(err["message"], str) and err["type"], text[:300]
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text[-300:]
        check()
    print("statuses of generated bodies:", dict(sorted(seen.items())))


# ---------------------------------------------------------------------------- replica killed mid-stream (last)


def engine_pid(app_name: str, dashboard_url: str) -> int:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url, filters=[("class_name", "=", f"ServeReplica:{app_name}:engine"), ("state", "=", "ALIVE")])
    assert len(actors) == 1, actors
    return actors[0]["pid"]


async def first_tokens_seen(client: httpx.AsyncClient) -> float:
    """How many requests the ingress has had a first token for (its TTFT histogram's count)."""
    text = (await client.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:time_to_first_token_seconds_count"))


def test_killed_engine_replica_ends_streams_with_error_and_done_and_new_requests_are_held(faults_app, local_stack):
    """SIGKILL of the engine replica while a plain request and a stream are generating (1000 tokens each).
    The stream starts once the plain request has its first token (else the ingress rightly retries it on
    the replacement and it answers 200); the kill comes at the stream's first chunk."""
    root, auth = faults_app["root"], {"Authorization": f"Bearer {API_KEY}"}
    long = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    pid = engine_pid("tiny-faults", local_stack.dashboard_url)

    async def main():
        async with httpx.AsyncClient(base_url=root, headers=auth, timeout=90) as c:
            seen = await first_tokens_seen(c)
            plain = asyncio.ensure_future(c.post("/v1/completions", json=long))
            for _ in range(300):  # <= 30 s
                await asyncio.sleep(0.1)
                if await first_tokens_seen(c) > seen or plain.done():
                    break
            assert not plain.done(), f"the plain request ended before the kill: {plain.result().status_code}"
            lines = []
            async with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():  # a cut chunked body raises here (httpx.RemoteProtocolError)
                    if line:
                        lines.append(line)
                    if len(lines) == 1:
                        os.kill(pid, signal.SIGKILL)
            return lines, await plain

    lines, plain = asyncio.run(main())
    assert not any('"finish_reason": "length"' in line for line in lines), \
        f"the stream finished before the kill took effect ({len(lines)} chunks): the test did not kill mid-stream"
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2].removeprefix("data: "))
    assert error.get("error", {}).get("code") == "replica_unavailable" and error["error"]["type"] == "server_error", lines[-3:]
    assert plain.status_code == 503 and plain.headers["content-type"].startswith("application/json"), (plain.status_code, plain.text[:300])
    assert openai_error(plain)["code"] == "replica_unavailable"
    # a new request is held / retried until the replacement replica serves it
    t0 = time.monotonic()
    r = faults_app["client"].post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text[:300]
    print(f"first request after the kill answered in {time.monotonic() - t0:.1f} s")
    assert engine_pid("tiny-faults", local_stack.dashboard_url) != pid
