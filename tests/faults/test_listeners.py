"""Nothing of the local stack answers beyond loopback, and Ray refuses a client without the token.

The stack (Ray head with dashboard/Jobs API, MLflow, a Serve proxy) runs from `local_stack`; its
listening sockets are read from /proc for every process of its sessions. Each must be bound to
loopback, or else refuse a client that has no token. The token itself is checked on the GCS (a raw
gRPC call, a Ray driver) and on the Jobs API, which a stack started with RAY_AUTH_MODE=disabled
(what `up` did before) would all answer.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from listeners import Listener, listeners_of

pytestmark = [pytest.mark.integration, pytest.mark.faults]

GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo"


def stack_pids(home: str) -> list[int]:
    from llmplatform.stack.processes import group_members
    from llmplatform.stack.state import read_state

    return [pid for comp in read_state(Path(home)).values() for pid in group_members(comp.process.pgid)]


def grpc_status_without_token(address: str):
    """The status of one raw gRPC call (no credentials) to the GCS at `address`."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(GCS_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def http_status_without_token(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def refuses_without_token(listener: Listener) -> bool:
    """A non-loopback listener is acceptable only when an anonymous gRPC or HTTP client is refused."""
    import grpc

    address = f"[{listener.host}]:{listener.port}" if ":" in listener.host else f"{listener.host}:{listener.port}"
    try:
        if grpc_status_without_token(address) == grpc.StatusCode.UNAUTHENTICATED:
            return True
    except Exception:
        pass
    try:
        return http_status_without_token(f"http://{address}/api/jobs/") in (401, 403)
    except OSError:
        return False


@pytest.fixture(scope="module")
def serve_proxy(local_stack):
    """Ray connected with the stack's token and a Serve proxy started as `platformctl serve` does."""
    import ray
    from ray import serve

    from llmplatform.backends.ray_auth import use_client_env
    from llmplatform.serving.app import connect, ensure_serve

    use_client_env(local_stack.client_env)
    connect(local_stack.ray_address)
    try:
        yield ensure_serve()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_every_listener_is_loopback_or_refuses_a_client_without_the_token(local_stack, serve_proxy):
    found = listeners_of(stack_pids(local_stack.home))
    ports = {x.port for x in found}
    for url in (local_stack.dashboard_url, local_stack.mlflow_url, serve_proxy):
        assert int(url.rstrip("/").rsplit(":", 1)[1]) in ports, f"{url} is not among the stack's listeners {sorted(ports)}"
    assert int(local_stack.ray_address.rsplit(":", 1)[1]) in ports
    assert len(found) >= 8  # GCS, raylet x2, dashboard, agents, client server, MLflow, Serve proxy
    exposed = [x for x in found if not x.loopback and not refuses_without_token(x)]
    assert exposed == [], "listening beyond loopback without auth:\n" + "\n".join(f"{x.host}:{x.port} {x.command}" for x in exposed)


def test_ray_refuses_clients_without_the_token(local_stack, tmp_path):
    import grpc

    token = Path(local_stack.client_env["RAY_AUTH_TOKEN_PATH"])
    assert local_stack.client_env["RAY_AUTH_MODE"] == "token"
    assert token.is_relative_to(local_stack.home) and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) == 64

    assert grpc_status_without_token(local_stack.ray_address) == grpc.StatusCode.UNAUTHENTICATED
    assert http_status_without_token(f"{local_stack.dashboard_url}/api/jobs/") == 401
    assert http_status_without_token(f"{local_stack.dashboard_url}/api/gcs_healthz") == 200  # health stays open

    # a Ray driver with no token (and no ~/.ray/auth_token to fall back on) is refused
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    code = f"import ray; ray.init(address={local_stack.ray_address!r}); print(ray.cluster_resources())"
    anon = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert anon.returncode != 0 and "CPU" not in anon.stdout, anon.stdout
    env.update(local_stack.client_env)
    member = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert member.returncode == 0 and "CPU" in member.stdout, member.stderr[-2000:]
