"""`up`, `down` and `status` of the embedded local stack, and where clients find it.

`up` starts what is not already running (a Ray head and an MLflow server, concurrently), after
checking every wanted port first so a taken port starts nothing; it waits for both health
checks and records them in the state file. `down` stops exactly the recorded process groups and
removes the state; MLflow's database and artifacts stay under `<home>/mlflow`. `status` reads the
state and asks each component over HTTP whether it is healthy.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from llmplatform import cpus
from llmplatform.errors import StackError
from llmplatform.paths import platform_home
from llmplatform.stack import mlflow_server, ray_head
from llmplatform.stack.ports import check_ports_free
from llmplatform.stack.processes import group_is_ours, is_ours, stop_groups, wait_healthy
from llmplatform.stack.state import ComponentState, read_state, remove_state, state_path, write_state

COMPONENTS = ("ray", "mlflow")
TITLES = {"ray": "Ray head", "mlflow": "MLflow server"}
DEFAULT_TIMEOUT = 180.0  # seconds; MLflow alone took ~40 s on a busy 2-core box
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL; a graceful Ray teardown takes 10 s+ here


@dataclass
class ComponentStatus:
    """What `status` reports for one component."""

    name: str
    state: str  # running | started | stopped | dead
    healthy: bool
    pid: int | None = None
    url: str | None = None
    log: str | None = None
    started: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StackInfo:
    """Where the local stack is: addresses for clients and each component's status."""

    home: str
    ray_address: str | None = None  # "127.0.0.1:PORT" for ray.init(address=...)
    dashboard_url: str | None = None  # Ray dashboard = Jobs API base URL
    mlflow_url: str | None = None  # MLflow tracking URI
    components: list[ComponentStatus] = field(default_factory=list)
    client_env: dict[str, str] = field(default_factory=dict)  # env Ray clients should set
    cpu_partition: dict[str, str] | None = None  # {"front": "1", "model": "0"} when the head runs partitioned

    @property
    def tracking_uri(self) -> str | None:
        return self.mlflow_url

    @property
    def healthy(self) -> bool:
        return bool(self.components) and all(c.healthy for c in self.components)

    def component(self, name: str) -> ComponentStatus:
        return next(c for c in self.components if c.name == name)

    def to_dict(self) -> dict:
        return {
            "home": self.home,
            "healthy": self.healthy,
            "ray_address": self.ray_address,
            "dashboard_url": self.dashboard_url,
            "mlflow_url": self.mlflow_url,
            "client_env": dict(self.client_env),
            "cpu_partition": self.cpu_partition,
            "components": [c.to_dict() for c in self.components],
        }


def _home(home: str | Path | None) -> Path:
    return Path(home).expanduser().resolve() if home else platform_home()


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Serialise up/down on one home (two `up`s at once must not both start a stack)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "stack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_healthy(comp: ComponentState) -> bool:
    if comp.name == "ray":
        return ray_head.ray_healthy(comp.url, comp.extra.get("client_env", {}).get("RAY_AUTH_TOKEN_PATH"))
    return mlflow_server.mlflow_healthy(comp.url)


def _info(home: Path, comps: dict[str, ComponentState], fresh: set[str] = frozenset()) -> StackInfo:
    """Build a StackInfo from recorded components, with live process and HTTP checks."""
    info = StackInfo(home=str(home))
    for name in COMPONENTS:
        comp = comps.get(name)
        if comp is None:
            info.components.append(ComponentStatus(name=name, state="stopped", healthy=False))
            continue
        alive = is_ours(comp.process)
        info.components.append(
            ComponentStatus(
                name=name,
                state=("started" if name in fresh else "running") if alive else "dead",
                healthy=alive and _is_healthy(comp),
                pid=comp.process.pid,
                url=comp.url,
                log=comp.process.log,
                started=comp.started,
            )
        )
        if name == "ray":
            info.ray_address = comp.extra.get("address")
            info.dashboard_url = comp.url
            info.client_env = dict(comp.extra.get("client_env", {}))
            info.cpu_partition = comp.extra.get("cpu_partition")
        else:
            info.mlflow_url = comp.url
    return info


def _check_port_values(wanted: list[tuple[str, int, str]]) -> None:
    """Ports must be real (1-65535) and distinct: Ray would silently pick another for 0."""
    seen: dict[int, str] = {}
    for component, port, flag in wanted:
        if not 1 <= port <= 65535:
            raise StackError(f"{flag} {port}: the {component} needs a port between 1 and 65535.")
        if port in seen:
            raise StackError(f"{flag} {port}: the same port is also asked for by {seen[port]}; give each its own.")
        seen[port] = f"the {component}"


def up(
    home: str | Path | None = None,
    *,
    ray_port: int = 6379,
    dashboard_port: int = 8265,
    mlflow_port: int = 5000,
    num_cpus: int = ray_head.DEFAULT_NUM_CPUS,
    cpu_partition: str = "auto",
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[str], None] | None = None,
) -> StackInfo:
    """Start whatever part of the stack is not running and wait until all of it is healthy.

    Idempotent: running components are left alone (their recorded ports and CPU partition win
    over the arguments); a dead one is restarted. `cpu_partition` is `auto`, `off` or the
    front-end CPUs (see llmplatform.cpus). Raises StackError for a bad `cpu_partition` and
    PortInUseError for a taken port before starting anything, and StackError (with the log tail)
    when a component fails to start.
    """
    home = _home(home)
    partition = cpus.plan_for_host(cpu_partition, cpus.gpu_present())  # a bad value starts nothing
    with _locked(home):
        comps = read_state(home)
        dead = [c for c in comps.values() if not is_ours(c.process)]
        stop_groups([c.process for c in dead if group_is_ours(c.process)])  # leftovers of a dead leader
        for comp in dead:
            del comps[comp.name]
        to_start = [name for name in COMPONENTS if name not in comps]
        wanted = []
        if "ray" in to_start:
            wanted += [("Ray head (GCS)", ray_port, "--ray-port"), ("Ray dashboard", dashboard_port, "--dashboard-port")]
        if "mlflow" in to_start:
            wanted += [("MLflow server", mlflow_port, "--mlflow-port")]
        _check_port_values(wanted)
        check_ports_free(wanted)

        logs = home / "logs"
        waiting = {}
        for name in to_start:
            if name == "ray":
                ports = ray_head.RayPorts.allocate(ray_port, dashboard_port)
                record = ray_head.start_ray_head(home, ports, logs / "ray-head.log", num_cpus, partition)
                comp = ComponentState(
                    name="ray", process=record, url=ray_head.dashboard_url(ports), ports=ports.to_dict(),
                    started=_now(),
                    extra={
                        "address": ray_head.ray_address(ports),
                        "temp_dir": str(ray_head.ray_temp_dir(home)),
                        "num_cpus": num_cpus,
                        "client_env": ray_head.client_env(ray_head.ensure_auth_token(home)),
                        "cpu_partition": partition.to_dict() if partition else None,
                    },
                )  # fmt: skip
            else:
                record = mlflow_server.start_mlflow(home / "mlflow", mlflow_port, logs / "mlflow.log")
                comp = ComponentState(
                    name="mlflow", process=record, url=mlflow_server.mlflow_url(mlflow_port),
                    ports={"http": mlflow_port}, started=_now(),
                    extra={"backend_store": str(home / "mlflow" / "mlflow.db"),
                           "artifacts": str(home / "mlflow" / "artifacts")},
                )  # fmt: skip
            comps[name] = comp
            waiting[TITLES[name]] = (record, (lambda c=comp: _is_healthy(c)))
        write_state(home, comps)  # record first, so `down` can clean up even if the wait fails

        if waiting and progress:
            progress(f"starting {', '.join(waiting)} under {home} (up to {timeout:.0f}s) ...")
        try:
            wait_healthy(waiting, timeout, progress)
        except BaseException:
            started = [comps.pop(n) for n in to_start]
            stop_groups([c.process for c in started])
            write_state(home, comps)
            raise
        return _info(home, comps, fresh=set(to_start))


def down(
    home: str | Path | None = None,
    timeout: float = STOP_GRACE,
    progress: Callable[[str], None] | None = None,
) -> StackInfo:
    """Stop the process groups `up` recorded (never anything else) and remove the runtime state
    (the state file and Ray's temp dir).

    Returns the StackInfo as it was just before stopping (what was stopped). A recorded PID that
    now belongs to another process is left alone. MLflow's data under `<home>/mlflow` is kept,
    so a later `up` shows the same runs.
    """
    home = _home(home)
    if not state_path(home).exists():
        return _info(home, {})  # nothing recorded: touch nothing, create nothing
    with _locked(home):
        comps = read_state(home)
        before = _info(home, comps)
        if comps and progress:
            progress("stopping " + ", ".join(f"{TITLES[n]} (pid {c.process.pid})" for n, c in comps.items()) + " ...")
        stop_groups([c.process for c in comps.values()], timeout)
        if "ray" in comps:  # sockets and session files of the stopped head; its log stays in <home>/logs
            ray_head.remove_temp_dir(Path(comps["ray"].extra.get("temp_dir", "")))
        remove_state(home)
        return before


def status(home: str | Path | None = None) -> StackInfo:
    """Each component's recorded PID and URL, whether it still runs, and a live health check."""
    home = _home(home)
    return _info(home, read_state(home))


def _running(home: str | Path | None, name: str) -> ComponentState | None:
    comp = read_state(_home(home)).get(name)
    return comp if comp is not None and is_ours(comp.process) else None


def _from_env_or_stack(env_var: str, name: str, what: str, home: str | Path | None) -> ComponentState | str:
    """`$env_var` if set, else the running stack's component `name` (or a StackError naming both)."""
    env = os.environ.get(env_var)
    if env:
        return env
    comp = _running(home, name)
    if comp is None:
        raise StackError(f"no {what} is running for {_home(home)}: run `platformctl up`, "
                         f"or set {env_var} to an existing one.")
    return comp


def tracking_uri(home: str | Path | None = None) -> str:
    """MLflow tracking URI: `$MLFLOW_TRACKING_URI`, else the running local stack's server."""
    found = _from_env_or_stack("MLFLOW_TRACKING_URI", "mlflow", "MLflow tracking server", home)
    return found if isinstance(found, str) else found.url


def ray_address(home: str | Path | None = None) -> str:
    """Ray GCS address: `$RAY_ADDRESS`, else the running local stack's head ("127.0.0.1:PORT")."""
    found = _from_env_or_stack("RAY_ADDRESS", "ray", "Ray head", home)
    return found if isinstance(found, str) else found.extra["address"]


def client_env_for(address: str, home: str | Path | None = None) -> dict[str, str]:
    """The env a Ray client needs for `address` (GCS address or dashboard URL): the running local
    stack's `client_env` (its token) when `address` is that stack's, else {}."""
    comp = _running(home, "ray")
    if comp is None or address not in (comp.extra.get("address"), comp.url):
        return {}
    return dict(comp.extra.get("client_env", {}))
