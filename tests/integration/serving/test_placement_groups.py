"""Tensor-parallel placement on a real Ray cluster, with a custom resource standing in for GPUs.

Two extra raylets join the session's Ray head on this machine, each offering 2 `srv_gpu`
(like two 2-GPU nodes). A tp=2 deployment must get a 2-bundle STRICT_PACK group on one node and
its engine must be told tp=2; a tp=4 deployment is larger than a node, so its group is PACK and
spreads over both nodes.
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.integration
RESOURCE = "srv_gpu"


# `ray start` for a worker node that stays on 127.0.0.1 like the stack's head: with the stack's
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray keeps every address on loopback but refuses to start a
# worker node; with 1 it resolves 127.0.0.1 to the host's address, where the head does not listen.
# So the check is lifted in this process only, and node addresses stay on loopback.
JOIN_ON_LOOPBACK = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


def _join_command(address: str, gpus: int) -> list[str]:
    import sys

    from llmplatform.stack import free_port

    ports = [free_port() for _ in range(6)]
    return [sys.executable, "-c", JOIN_ON_LOOPBACK, "start", "--address", address, "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "3",
            "--resources", json.dumps({RESOURCE: gpus}), "--object-store-memory", str(200 * 1024 * 1024),
            "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--metrics-export-port", str(ports[2]), "--dashboard-agent-listen-port", str(ports[3]),
            "--dashboard-agent-grpc-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
            "--disable-usage-stats"]


@pytest.fixture(scope="module")
def two_gpu_nodes(serving_env, local_stack, tmp_path_factory):
    """Two raylets with 2 `srv_gpu` each, in their own process groups; stopped by process group.

    They join with the stack's Ray token, on 127.0.0.1 (see JOIN_ON_LOOPBACK)."""
    import ray

    from llmplatform.stack.processes import start_process, stop_group

    logs = tmp_path_factory.mktemp("raylets")
    env = {**local_stack.client_env, "RAY_USAGE_STATS_ENABLED": "0"}
    records = []
    try:
        for i in range(2):  # one at a time: two raylets registering at once on one IP can time out
            records.append(start_process(_join_command(serving_env["ray_address"], 2), logs / f"node{i}.log", env=env))
            deadline = time.time() + 120
            while sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(RESOURCE)) < i + 1:
                if time.time() > deadline:
                    raise RuntimeError(f"raylet {i} did not join: " + (logs / f"node{i}.log").read_text()[-1500:])
                time.sleep(1)
        yield records
    finally:
        for r in records:
            stop_group(r)


def _group(pg_hex: str) -> dict:
    from ray.util import placement_group_table

    return placement_group_table()[pg_hex] if pg_hex in placement_group_table() else next(
        v for k, v in placement_group_table().items() if k.startswith(pg_hex) or pg_hex.startswith(k))


def _deploy(name: str, tp: int) -> dict:
    from llmplatform.backends.serving import deploy_spec

    spec = {"name": name, "engine": "hf", "model": {"base": "llama2-tiny-random"}, "tensor_parallel": tp, "max_model_len": 256,
            "resources": {"accelerator_resource": RESOURCE, "cpus_per_shard": 0.5}, "limits": {"max_batch_size": 4}}
    return deploy_spec(spec, timeout_s=180)


def test_tp2_group_is_strict_pack_on_one_node_and_engine_gets_tp2(two_gpu_nodes):
    from llmplatform.serving import app

    try:
        st = _deploy("tp-two", 2)
        assert st["engine"]["tensor_parallel"] == 2
        pg = _group(st["engine"]["placement_group"])
        assert pg["strategy"] == "STRICT_PACK" and pg["state"] == "CREATED"
        assert len(pg["bundles"]) == 2 and all(b.get(RESOURCE) == 1 for b in pg["bundles"].values())
        assert len(set(pg["bundles_to_node_id"].values())) == 1
    finally:
        app.delete("tp-two")


def test_tp4_group_larger_than_a_node_spreads_over_two(two_gpu_nodes):
    from llmplatform.serving import app

    try:
        st = _deploy("tp-four", 4)
        assert st["engine"]["tensor_parallel"] == 4
        pg = _group(st["engine"]["placement_group"])
        assert pg["strategy"] == "PACK" and len(pg["bundles"]) == 4
        assert len(set(pg["bundles_to_node_id"].values())) == 2
    finally:
        app.delete("tp-four")
