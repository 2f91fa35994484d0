"""The environment Ray Serve processes of a deployment run with.

`replica_env` is what every replica gets: the platform settings forwarded from the deploying
process (model cache, registry, threads) plus Ray Serve's fast path. `SERVE_FAST_PATH_ENV` is
also what the local stack's Ray head starts with (stack/ray_head.py imports it from here:
serving code never imports the stack, the stack may import serving).
"""

from __future__ import annotations

# Where replicas find the model cache and the registry: forwarded from the deploying process.
FORWARDED_ENV = ("PLATFORM_HOME", "PLATFORM_MODEL_CACHE", "MLFLOW_TRACKING_URI", "PLATFORM_ENGINE_THREADS", "HF_HUB_OFFLINE",
                 "PLATFORM_USAGE_DB")

# Ray Serve's throughput-optimized settings (user code and router on the replica's event loop,
# gRPC between deployments, buffered request logs, no replica logs on stderr), without direct
# ingress so clients keep the one proxy URL. Every streamed token crosses the proxy and two
# replicas; on 2 CPU cores with the vllm engine at 16 streams this took 310 -> 406 output tok/s.
# A head's env reaches the proxy; `replica_env` sets it on the replicas of any cluster.
SERVE_FAST_PATH_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}

# The hf engine has its own decode thread; its replicas keep Serve's default of user code on a
# separate thread. Measured on 2 cores, 32 prompts at 16 streams: before the engine stopped
# taking its model lock on the event loop, 106 tok/s with user code on the replica loop vs 167 on
# the separate thread; after that fix the two are equal (280 vs 265, within noise).
HF_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}


def replica_env(environ, engine: str = "vllm") -> dict[str, str]:
    """Environment variables for the replicas: forwarded platform settings plus Serve's fast path
    (for the hf engine, with user code on Serve's own thread). The caller's own setting wins."""
    env = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    fast = {**SERVE_FAST_PATH_ENV, **(HF_REPLICA_ENV if engine == "hf" else {})}
    env.update({k: environ.get(k, v) for k, v in fast.items()})
    return env
