"""The Ray head of the local stack: `ray start --head --block` with dashboard and Jobs API.

The head runs as our child in its own session, so its process group holds the GCS, raylet,
dashboard and their helpers, and `down` stops exactly that group. Every port Ray would
otherwise take from a fixed default (client server 10001, dashboard agent 52365, ...) gets a
free one, so several stacks (other users, tests) can share a machine. Logical CPUs are
over-subscribed (default 8) because placement groups on a 2-core box need more than 2.

Token authentication (Ray 2.60, `RAY_AUTH_MODE`): `ray start` turns it on when a token file
such as ~/.ray/auth_token happens to exist, which would make the head's behaviour depend on
unrelated earlier runs. The local stack binds 127.0.0.1 only and sets `RAY_AUTH_MODE=disabled`
explicitly; the state records this in `client_env` for clients that want to match it.
(Clients need nothing: a client with or without a token connects to it.) Note that Ray itself
resolves 127.0.0.1 to the machine's IP on Linux, so its GCS and raylet listen on all
interfaces; only the dashboard is bound to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llmplatform.cpus import FRONT_ENV, MODEL_ENV, CpuPartition
from llmplatform.serving.environment import SERVE_FAST_PATH_ENV  # the head's env reaches the Serve proxy
from llmplatform.stack.ports import HOST, free_port
from llmplatform.stack.processes import ProcessRecord, http_ok, start_process

# No drain on SIGTERM: a local head has no Serve proxies to quiesce, and the 30 s default
# drain would make every `down` wait for it.
# A RAY_ADDRESS in the caller's env points at some other cluster; the head must not see it.
RAY_ENV: dict[str, str | None] = {
    **SERVE_FAST_PATH_ENV,
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_ADDRESS": None,
}
CLIENT_ENV = {"RAY_AUTH_MODE": "disabled"}
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

    @classmethod
    def allocate(cls, gcs: int, dashboard: int) -> "RayPorts":
        taken = {gcs, dashboard}
        extra = []
        while len(extra) < 7:
            port = free_port()
            if port not in taken:
                taken.add(port)
                extra.append(port)
        return cls(gcs, dashboard, *extra)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


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


def head_env(partition: CpuPartition | None) -> dict[str, str | None]:
    """RAY_ENV plus the CPU partition every Ray worker reads (cleared when there is none)."""
    return {**RAY_ENV, FRONT_ENV: None, MODEL_ENV: None, **(partition.env() if partition else {})}


def start_ray_head(home: Path, ports: RayPorts, log_path: Path, num_cpus: int = DEFAULT_NUM_CPUS,
                   partition: CpuPartition | None = None) -> ProcessRecord:
    """Start the head in its own process group; returns at once (see `ray_healthy`).

    With a CPU partition (see llmplatform.cpus) the head, and so every Ray process, starts
    on the partition's front-end CPUs."""
    temp_dir = ray_temp_dir(home)
    temp_dir.mkdir(parents=True, exist_ok=True)
    return start_process(ray_command(ports, temp_dir, num_cpus), Path(log_path), env=head_env(partition),
                         cpus=partition.front if partition else None)


def ray_address(ports: RayPorts, host: str = HOST) -> str:
    """The GCS address for `ray.init(address=...)`."""
    return f"{host}:{ports.gcs}"


def dashboard_url(ports: RayPorts, host: str = HOST) -> str:
    """The dashboard, also the Jobs API base (`JobSubmissionClient(dashboard_url)`)."""
    return f"http://{host}:{ports.dashboard}"


def ray_healthy(url: str) -> bool:
    """The dashboard answers `/api/version` (it needs the GCS, so this covers both)."""
    return http_ok(f"{url}/api/version")
