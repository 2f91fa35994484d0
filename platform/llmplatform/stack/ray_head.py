"""The Ray head of the local stack: `ray start --head --block` with dashboard and Jobs API.

The head runs as our child in its own session, so its process group holds the GCS, raylet,
dashboard and their helpers, and `down` stops exactly that group. Every port Ray would
otherwise take from a fixed default (client server 10001, dashboard agent 52365, ...) gets a
free one, so several stacks (other users, tests) can share a machine. Logical CPUs are
over-subscribed (default 8) because placement groups on a 2-core box need more than 2.

Nothing listens beyond loopback. On Linux Ray resolves 127.0.0.1 to the machine's address for
its GCS, raylet, object manager, client server and metrics exporters (so `--node-ip-address
127.0.0.1` alone leaves them on the network); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the node
address at 127.0.0.1 and every one of them binds there. Token authentication (Ray 2.60,
`RAY_AUTH_MODE=token`) is on as well, for any listener a Ray version binds more widely and for
other local users: the token is generated once per PLATFORM_HOME (`<home>/ray/auth_token`, mode
0600, see `ensure_auth_token`) and named by `RAY_AUTH_TOKEN_PATH`, never ~/.ray/auth_token, so the
head never depends on some unrelated earlier run. The state records `client_env(token)` for
every client (CLI, local job backend, `platformctl serve`); jobs and their workers inherit the
head's env. The dashboard (Jobs API included) checks the token too, except for its health checks.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llmplatform.cpus import FRONT_ENV, MODEL_ENV, CpuPartition
from llmplatform.errors import StackError
from llmplatform.serving.environment import SERVE_FAST_PATH_ENV  # the head's env reaches the Serve proxy
from llmplatform.stack.ports import HOST, free_port
from llmplatform.stack.processes import ProcessRecord, http_ok, start_process

# No drain on SIGTERM: a local head has no Serve proxies to quiesce, and the 30 s default
# drain would make every `down` wait for it.
# A RAY_ADDRESS in the caller's env points at some other cluster; the head must not see it.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray keep 127.0.0.1 as the node address instead of
# resolving it to the host's (ray._private.services.get_node_ip_address), so every listener binds
# 127.0.0.1 (tests/faults/test_listeners.py). The cost: no other node can join; a laptop stack never wants one.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # head and clients alike: both resolve the node address
RAY_ENV: dict[str, str | None] = {
    **LOOPBACK_ENV,
    **SERVE_FAST_PATH_ENV,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_ADDRESS": None,
}
AUTH_TOKEN_FILE = Path("ray") / "auth_token"  # under PLATFORM_HOME
DEFAULT_NUM_CPUS = 8
OBJECT_STORE_BYTES = 1 << 30  # 1 GiB: plenty for the local stack, kind to a shared 24 GiB box


@dataclass(frozen=True)
class RayPorts:
    """Every port the head binds. `gcs` and `dashboard` come from the user; the rest are free ports."""

    gcs: int
    dashboard: int
    client_server: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    metrics_export: int
    node_manager: int
    object_manager: int
    dashboard_metrics: int  # Ray's defaults (44227, 44217) are fixed: a second stack would lose them
    autoscaler_metrics: int

    @classmethod
    def allocate(cls, gcs: int, dashboard: int) -> "RayPorts":
        taken = {gcs, dashboard}
        extra = []
        while len(extra) < 9:
            port = free_port()
            if port not in taken:
                taken.add(port)
                extra.append(port)
        return cls(gcs, dashboard, *extra)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def ensure_auth_token(home: Path) -> Path:
    """`<home>/ray/auth_token`: the Ray token of this home, created (mode 0600) when missing.

    256 random bits as hex, like `ray get-auth-token --generate`. A token file readable by others
    is refused: anyone who can read it can run code on the cluster."""
    path = Path(home) / AUTH_TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            raise StackError(f"{path} is readable by other users; `chmod 600 {path}` (or delete it for a new token)") from None
        return path
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path


def client_env(token_path: Path | str) -> dict[str, str]:
    """The env a Ray client (ray.init, Jobs API, Serve) needs to reach a head using this token
    (and to look for it at 127.0.0.1 rather than at the host's address)."""
    return {**LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def ray_temp_dir(home: Path) -> Path:
    """A short, per-home Ray temp dir under /tmp (unix socket paths must stay under ~107 chars)."""
    digest = hashlib.sha1(str(Path(home).resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"llmp-{digest}"


def remove_temp_dir(path: Path) -> None:
    """Delete a stopped head's temp dir, but only one `ray_temp_dir` made (/tmp/llmp-*)."""
    if path.parent == Path("/tmp") and path.name.startswith("llmp-"):
        shutil.rmtree(path, ignore_errors=True)


def ray_command(ports: RayPorts, temp_dir: Path, num_cpus: int = DEFAULT_NUM_CPUS, host: str = HOST) -> list[str]:
    """The `ray start --head --block` command line."""
    ray_cli = Path(sys.executable).parent / "ray"  # the console script next to this python
    launcher = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    return [
        *launcher, "start", "--head", "--block",
        "--node-ip-address", host,
        "--port", str(ports.gcs),
        "--include-dashboard", "true",
        "--dashboard-host", host,
        "--dashboard-port", str(ports.dashboard),
        "--ray-client-server-port", str(ports.client_server),
        "--dashboard-agent-listen-port", str(ports.dashboard_agent_listen),
        "--dashboard-agent-grpc-port", str(ports.dashboard_agent_grpc),
        "--runtime-env-agent-port", str(ports.runtime_env_agent),
        "--metrics-export-port", str(ports.metrics_export),
        "--node-manager-port", str(ports.node_manager),
        "--object-manager-port", str(ports.object_manager),
        "--num-cpus", str(num_cpus),
        "--object-store-memory", str(OBJECT_STORE_BYTES),
        "--temp-dir", str(temp_dir),
        "--disable-usage-stats",
    ]  # fmt: skip


def head_env(partition: CpuPartition | None, token_path: Path | str, ports: RayPorts | None = None) -> dict[str, str | None]:
    """RAY_ENV, token auth with `token_path` (a stray RAY_AUTH_TOKEN of the caller is dropped),
    the metrics exporters' ports, plus the CPU partition every Ray worker reads (cleared when
    there is none)."""
    auth = {**client_env(token_path), "RAY_AUTH_TOKEN": None}
    metrics = {"DASHBOARD_METRIC_PORT": str(ports.dashboard_metrics), "AUTOSCALER_METRIC_PORT": str(ports.autoscaler_metrics)} if ports else {}
    return {**RAY_ENV, **auth, **metrics, FRONT_ENV: None, MODEL_ENV: None, **(partition.env() if partition else {})}


def start_ray_head(home: Path, ports: RayPorts, log_path: Path, num_cpus: int = DEFAULT_NUM_CPUS,
                   partition: CpuPartition | None = None) -> ProcessRecord:
    """Start the head in its own process group; returns at once (see `ray_healthy`).

    With a CPU partition (see llmplatform.cpus) the head, and so every Ray process, starts
    on the partition's front-end CPUs."""
    temp_dir = ray_temp_dir(home)
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = head_env(partition, ensure_auth_token(home), ports)
    return start_process(ray_command(ports, temp_dir, num_cpus), Path(log_path), env=env,
                         cpus=partition.front if partition else None)


def ray_address(ports: RayPorts, host: str = HOST) -> str:
    """The GCS address for `ray.init(address=...)`."""
    return f"{host}:{ports.gcs}"


def dashboard_url(ports: RayPorts, host: str = HOST) -> str:
    """The dashboard, also the Jobs API base (`JobSubmissionClient(dashboard_url)`)."""
    return f"http://{host}:{ports.dashboard}"


def auth_header(token_path: Path | str | None) -> dict[str, str]:
    """The HTTP header Ray's dashboard and Jobs API want for the token in `token_path` (none: {})."""
    return {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"} if token_path else {}


def ray_healthy(url: str, token_path: Path | str | None = None) -> bool:
    """The dashboard answers `/api/version` with the token (it needs the GCS, so this covers both)."""
    try:
        headers = auth_header(token_path)
    except OSError:
        return False
    return http_ok(f"{url}/api/version", headers=headers)
