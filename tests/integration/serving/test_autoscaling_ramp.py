"""autoscaling.metric queue_depth on a real deployment: a load that queues in the engine (more
streams than its batch rows) adds a replica although in-flight requests stay far below
`target_ongoing_requests`; when the load ends the deployment shrinks back."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import BASE

pytestmark = pytest.mark.integration
NAME = "tiny-ramp"


def engine_running(name: str) -> int:
    from llmplatform.serving.coldstart import running_engine_replicas

    return running_engine_replicas(name)


def test_a_growing_engine_queue_adds_a_replica_and_idle_removes_it(serving_env):
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app

    spec = {"name": NAME, "engine": "hf", "max_model_len": 128, "route_prefix": "/ramp",
            "model": {"base": BASE, "allow_dynamic_adapters": False}, "resources": {"cpus_per_shard": 0.5},
            "limits": {"max_batch_size": 2, "request_timeout_s": 240},  # 2 rows: the 3rd stream waits in the engine
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "metric": "queue_depth", "target": 1, "downscale_delay_s": 5}}
    status = deploy_spec(spec, serving_env["ray_address"])
    client = openai.OpenAI(base_url=status["url"], api_key="none", max_retries=0, timeout=240)
    peak, stop = [1], time.time() + 180

    def stream_until_scaled(_: int) -> int:
        done = 0
        while peak[0] < 2 and time.time() < stop:  # 6 streams over 2 rows: 4 wait; 6 in flight << 16 (target_ongoing_requests)
            client.completions.create(model=BASE, prompt="Hello", max_tokens=48, extra_body={"ignore_eos": True})
            done += 1
        return done

    def watch() -> None:
        while peak[0] < 2 and time.time() < stop:
            peak[0] = max(peak[0], engine_running(NAME))
            time.sleep(1)

    try:
        with ThreadPoolExecutor(7) as pool:
            watcher = pool.submit(watch)
            finished = list(pool.map(stream_until_scaled, range(6)))
            watcher.result()
        assert peak[0] == 2, "the queue never brought a second engine replica"
        assert sum(finished) >= 1
        deadline = time.time() + 120
        while engine_running(NAME) > 1 and time.time() < deadline:
            time.sleep(2)
        assert engine_running(NAME) == 1  # idle: back to min_replicas after downscale_delay_s
    finally:
        app.delete(NAME)
