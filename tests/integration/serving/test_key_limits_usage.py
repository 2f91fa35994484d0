"""Per-key limits across ingress replicas, and usage that survives a replica restart.

One module deployment (`tiny-keys`, topology colocated with 2 replicas, so 2 ingress replicas
behind the proxy) with two keys from a keys file: `team-limited` (rpm=4) and `team-free`. Both
load at once; the limited key gets 429 + Retry-After past its minute's allowance however the
proxy spreads its requests over the replicas, the other key gets none. Then one ingress replica
is SIGKILLed and replaced, and `platformctl usage` still reports exactly the requests and tokens
the clients counted.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import openai
import pytest

from conftest import BASE

pytestmark = pytest.mark.integration
APP, RPM = "tiny-keys", 4
LIMITED_KEY, FREE_KEY, GONE_KEY = "sk-limited-test-key", "sk-free-test-key", "sk-gone-test-key"


@pytest.fixture(scope="module")
def keys_app(serving_env, tmp_path_factory):
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app
    from llmplatform.serving.keys import hash_key

    keys = tmp_path_factory.mktemp("limit-keys") / "keys.txt"
    keys.write_text(f"sha256:{hash_key(LIMITED_KEY)} name=team-limited rpm={RPM}\n"
                    f"sha256:{hash_key(FREE_KEY)} name=team-free rpm=1000 tpm=1000000\n"
                    f"sha256:{hash_key(GONE_KEY)}\n")  # the old format: named key-<hash prefix>
    spec = {"name": APP, "engine": "hf", "topology": "colocated", "max_model_len": 256, "route_prefix": "/keys",
            "model": {"base": BASE, "allow_dynamic_adapters": False},
            "autoscaling": {"min_replicas": 2, "max_replicas": 2},
            "resources": {"cpus_per_shard": 0.5},
            "auth": {"enabled": True, "api_keys_file": str(keys), "api_keys_env": None}}
    status = deploy_spec(spec, serving_env["ray_address"])
    yield status
    app.delete(APP)


class Client:
    """One key's client side: what it sent and what the server said it used."""

    def __init__(self, url: str, key: str):
        self.api = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        self.lock = threading.Lock()
        self.sent = self.ok = self.prompt = self.completion = 0
        self.limited: list[tuple] = []  # (Retry-After, error code) of each 429
        self.other_errors: list[str] = []

    def one(self, i: int) -> None:
        messages = [{"role": "user", "content": f"Say something about the number {i}"}]
        with self.lock:
            self.sent += 1
        try:
            if i % 2:
                usage = None
                for chunk in self.api.chat.completions.create(model=BASE, messages=messages, max_tokens=3, stream=True,
                                                              stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                    usage = chunk.usage or usage
            else:
                usage = self.api.chat.completions.create(model=BASE, messages=messages, max_tokens=3,
                                                         extra_body={"ignore_eos": True}).usage
        except openai.RateLimitError as exc:
            with self.lock:
                self.limited.append((exc.response.headers.get("retry-after"), exc.code))
            return
        except openai.APIError as exc:
            with self.lock:
                self.other_errors.append(repr(exc))
            return
        with self.lock:
            self.ok += 1
            self.prompt += usage.prompt_tokens
            self.completion += usage.completion_tokens

    def load(self, n: int, streams: int = 4) -> None:
        todo = iter(range(n))
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                self.one(i)

        threads = [threading.Thread(target=worker) for _ in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def ingress_replicas(dashboard_url: str) -> list[dict]:
    from ray.util.state import list_actors

    return list_actors(address=dashboard_url, filters=[("class_name", "=", f"ServeReplica:{APP}:ingress"), ("state", "=", "ALIVE")])


def usage_by_key() -> dict[str, dict]:
    from llmplatform.cli.main import main
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["usage", "--since", "1h", "--by", "key", "--output", "json"]) == 0
    return {r["key"]: r for r in json.loads(out.getvalue())}


def wait_for_usage(clients: dict[str, "Client"], timeout_s: float = 30.0) -> None:
    """Until `platformctl usage --by key` reports exactly what each client counted (requests, prompt and
    completion tokens, errors = its 429s and other errors); fails with both after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        totals = usage_by_key()
        got = {name: tuple(totals.get(name, {}).get(c, 0) for c in ("requests", "prompt_tokens", "completion_tokens", "errors"))
               for name in clients}
        want = {name: (c.sent, c.prompt, c.completion, len(c.limited) + len(c.other_errors)) for name, c in clients.items()}
        if got == want:
            return
        assert time.monotonic() < deadline, f"usage store {got} != clients' counts {want}"
        time.sleep(0.5)


def replicas_that_served(key: str) -> set[str]:
    from sqlalchemy import text

    from llmplatform.serving.usage import UsageStore, usage_db_url

    store = UsageStore(usage_db_url())
    with store.engine.connect() as conn:
        found = {r[0] for r in conn.execute(text("SELECT DISTINCT replica FROM request_usage WHERE deployment = :d AND key = :k"),
                                            {"d": APP, "k": key})}
    store.close()
    return found


def test_an_over_limit_key_gets_429s_across_replicas_the_other_none_and_usage_survives_a_restart(keys_app, local_stack):
    from llmplatform.serving.usage import FLUSH_S

    assert len(ingress_replicas(local_stack.dashboard_url)) == 2
    url = keys_app["url"]
    limited, free = Client(url, LIMITED_KEY), Client(url, FREE_KEY)
    t0 = time.monotonic()
    loads = [threading.Thread(target=limited.load, args=(16,)), threading.Thread(target=free.load, args=(16,))]
    for t in loads:
        t.start()
    for t in loads:
        t.join()
    elapsed = time.monotonic() - t0
    print(f"load took {elapsed:.1f} s; limited: {limited.ok} ok, {len(limited.limited)} x 429; free: {free.ok} ok")

    assert free.other_errors == [] and limited.other_errors == []
    assert free.ok == 16 and free.limited == []  # the other key is unaffected
    allowance = RPM + int(elapsed * RPM / 60)  # a minute's burst, then rpm/60 per second
    assert RPM <= limited.ok <= allowance and len(limited.limited) == 16 - limited.ok
    assert all(ra is not None and int(ra) >= 1 and code == "rate_limit_exceeded" for ra, code in limited.limited)  # Retry-After in s
    wait_for_usage({"team-limited": limited, "team-free": free})  # every replica wrote its counts (each flushes every FLUSH_S)
    # the limit is the deployment's: both ingress replicas served the limited key, and together they
    # admitted no more than one bucket allows (each replica counting alone would admit up to 2 x RPM)
    assert len(replicas_that_served("team-limited")) == 2 and elapsed < 60 and limited.ok < 2 * RPM

    # restart: SIGKILL one ingress replica; Serve replaces it
    victim = ingress_replicas(local_stack.dashboard_url)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:
        alive = ingress_replicas(local_stack.dashboard_url)
        if len(alive) == 2 and victim["actor_id"] not in {a["actor_id"] for a in alive}:
            break
        assert time.monotonic() < deadline, f"no replacement replica after 180 s: {alive}"
        time.sleep(1)
    free.load(4)  # after the restart: requests land on the new replica too
    limited.one(200)  # the limiter kept its count through the ingress restart: most likely 429 again
    wait_for_usage({"team-limited": limited, "team-free": free})
    time.sleep(2 * FLUSH_S)
    wait_for_usage({"team-limited": limited, "team-free": free}, timeout_s=0)  # and nothing is counted twice


def test_a_stream_the_client_abandons_still_counts_its_request_and_tokens(keys_app):
    import httpx

    from llmplatform.serving.keys import default_name, hash_key
    from llmplatform.serving.usage import FLUSH_S

    body = {"model": BASE, "messages": [{"role": "user", "content": "Tell a long story"}], "max_tokens": 200, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", keys_app["url"] + "/chat/completions", json=body, headers={"Authorization": f"Bearer {GONE_KEY}"}) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks >= 3:
                    break  # leave: the connection closes mid-stream
    name, deadline = default_name(hash_key(GONE_KEY)), time.monotonic() + 30
    while name not in usage_by_key():
        assert time.monotonic() < deadline, "the abandoned stream was never counted"
        time.sleep(0.5)
    time.sleep(2 * FLUSH_S)
    row = usage_by_key()[name]
    assert row["requests"] == 1 and row["prompt_tokens"] > 0 and 1 <= row["completion_tokens"] <= 200 and row["errors"] == 0
