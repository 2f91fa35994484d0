"""A RayCluster played on this machine: one real Ray node per pod of a KubeRay `rayClusterSpec`.

`LocalRayCluster.start(cluster_spec, namespace, api, workdir)` starts the head from
`headGroupSpec` and one raylet per replica of each `workerGroupSpecs` entry, as KubeRay's pods
would run `ray start`:

- `rayStartParams` become `ray start` flags (`--key=value`); CPUs come from the Ray container's
  resources (limits, else requests, rounded up, as KubeRay does) unless `num-cpus` is given,
  `nvidia.com/gpu` becomes `--num-gpus` (declared even though there is no CUDA here), memory
  `--memory`, and the `resources` param `--resources`;
- each node process gets exactly its container's env (`kuberay_pods.container_env`: Secrets,
  ConfigMaps, volumes as directories) plus the Ray plumbing below;
- what differs from a cluster, because everything shares one loopback interface: every port is
  a free port on 127.0.0.1 (`dashboard-host: 0.0.0.0` is served on 127.0.0.1), Ray 2.60 token
  auth is on (a token per cluster under its directory), nodes join on loopback (the trick of
  tests/integration/serving/test_placement_groups.py), the object store is small.

Each node is its own process group/session (`llmplatform.stack.processes`): `stop()` stops them
all by group and waits, `kill()` SIGKILLs them at once (a node loss), `pids()` lists every live
process of the cluster. PVC volumes live under `<workdir>/pvc/`, so clusters started with the same
workdir share them.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kuberay_pods import PodEnv, container_env

OBJECT_STORE_BYTES = 256 * 1024 * 1024  # per node; KubeRay would take 30% of the pod's memory
GPU_RESOURCE = "nvidia.com/gpu"
# Flags the harness owns (ports, addresses, blocking); a spec's value for them is not used.
OWNED_PARAMS = {"port", "address", "dashboard-host", "dashboard-port", "node-ip-address", "block", "head", "temp-dir",
                "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port", "node-manager-port", "object-manager-port", "num-cpus", "num-gpus", "memory", "resources"}
_cluster_counter = itertools.count(1)

# `ray start` on loopback for every node (see test_placement_groups.py): with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray keeps addresses on 127.0.0.1 but refuses worker nodes,
# so the check is lifted in the `ray start` process only.
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


class ClusterStartError(RuntimeError):
    """A node did not come up; the message has the tail of its log."""


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "2", "8Gi", 1) as a number (bytes for memory units)."""
    text = str(value).strip()
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def _parse_resources(raw: Any) -> dict[str, float]:
    """KubeRay's `resources` rayStartParam: a JSON object, often quoted ('"{\\"x\\": 1}"')."""
    text = str(raw).strip()
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1].replace('\\"', '"')
    return json.loads(text)


def node_resources(start_params: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any]:
    """{num_cpus, num_gpus, memory, resources} of a node, as KubeRay derives them for `ray start`."""
    res = container.get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}

    def pick(key: str) -> Any:
        return limits.get(key, requests.get(key))

    cpu = start_params.get("num-cpus", pick("cpu"))
    gpus = start_params.get("num-gpus", pick(GPU_RESOURCE))
    memory = start_params.get("memory", pick("memory"))
    return {
        "num_cpus": int(math.ceil(quantity(cpu))) if cpu is not None else None,
        "num_gpus": int(quantity(gpus)) if gpus is not None else None,
        "memory": int(quantity(memory)) if memory is not None else None,
        "resources": _parse_resources(start_params["resources"]) if "resources" in start_params else {},
    }


def resource_flags(r: Mapping[str, Any]) -> list[str]:
    flags = []
    if r["num_cpus"] is not None:
        flags += ["--num-cpus", str(r["num_cpus"])]
    if r["num_gpus"] is not None:
        flags += ["--num-gpus", str(r["num_gpus"])]
    if r["memory"] is not None:
        flags += ["--memory", str(r["memory"])]
    if r["resources"]:
        flags += ["--resources", json.dumps(r["resources"])]
    return flags


def passthrough_flags(start_params: Mapping[str, Any]) -> list[str]:
    """The rayStartParams the harness does not own, as KubeRay writes them (`--key=value`)."""
    return [f"--{k}={v}" for k, v in sorted(start_params.items()) if k not in OWNED_PARAMS and k != "object-store-memory"]


def _free_ports(n: int, taken: set[int]) -> list[int]:
    from llmplatform.stack.ports import free_port

    out: list[int] = []
    while len(out) < n:
        port = free_port()
        if port not in taken:
            taken.add(port)
            out.append(port)
    return out


@dataclass
class NodeProcess:
    """One pod's `ray start` process group."""

    pod: str
    group: str  # "head" or the worker group's name
    record: Any  # llmplatform.stack.processes.ProcessRecord
    env: PodEnv
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalRayCluster:
    """A running local Ray cluster shaped by a rayClusterSpec (see the module docstring)."""

    name: str
    namespace: str
    directory: Path
    gcs_address: str
    dashboard_url: str
    serve_port: int
    token_path: Path
    head_env: PodEnv
    nodes: list[NodeProcess]
    temp_dir: Path

    # ------------------------------------------------------------------ start

    @classmethod
    def start(cls, cluster_spec: dict, namespace: str, api: Any, workdir: Path, name: str | None = None,
              timeout_s: float = 120.0) -> "LocalRayCluster":
        """Start the head, wait for its dashboard, then each worker replica (one at a time: raylets
        registering at once on one IP can time out). Stops what it started if anything fails."""
        from llmplatform.stack.ray_head import RayPorts, ensure_auth_token, head_env as ray_head_env, ray_temp_dir

        workdir = Path(workdir)
        name = name or f"raycluster-{next(_cluster_counter)}"
        directory = workdir / "clusters" / f"{namespace}-{name}-{next(_cluster_counter)}"
        directory.mkdir(parents=True, exist_ok=True)
        token = ensure_auth_token(directory)
        taken: set[int] = set()
        gcs, dash, serve_port = _free_ports(3, taken)
        ports = RayPorts(gcs, dash, *_free_ports(9, taken))
        temp_dir = ray_temp_dir(directory)
        temp_dir.mkdir(parents=True, exist_ok=True)
        plumbing = {k: v for k, v in ray_head_env(None, token, ports).items() if v is not None}
        plumbing.update({"RAY_CLUSTER_NAME": name, "RAY_USAGE_STATS_ENABLED": "0"})

        head_spec = cluster_spec["headGroupSpec"]
        head_pod = head_spec["template"]["spec"]
        head_ctr = head_pod["containers"][0]  # KubeRay: the Ray container is the first
        head_pod_name = f"{name}-head"
        head_env = container_env(head_ctr, head_pod, namespace, api, workdir, pod_name=f"{directory.name}/{head_pod_name}")
        params = {k: str(v) for k, v in (head_spec.get("rayStartParams") or {}).items()}
        head_res = node_resources(params, head_ctr)
        command = [
            sys.executable, "-c", JOIN_ON_LOOPBACK, "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--port", str(ports.gcs),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports.dashboard),
            "--ray-client-server-port", str(ports.client_server),
            "--dashboard-agent-listen-port", str(ports.dashboard_agent_listen),
            "--dashboard-agent-grpc-port", str(ports.dashboard_agent_grpc),
            "--runtime-env-agent-port", str(ports.runtime_env_agent),
            "--metrics-export-port", str(ports.metrics_export),
            "--node-manager-port", str(ports.node_manager), "--object-manager-port", str(ports.object_manager),
            "--object-store-memory", params.get("object-store-memory", str(OBJECT_STORE_BYTES)),
            "--temp-dir", str(temp_dir), "--disable-usage-stats",
            *resource_flags(head_res), *passthrough_flags(params),
        ]  # fmt: skip
        cluster = cls(name=name, namespace=namespace, directory=directory, gcs_address=f"127.0.0.1:{ports.gcs}",
                      dashboard_url=f"http://127.0.0.1:{ports.dashboard}", serve_port=serve_port, token_path=token,
                      head_env=head_env, nodes=[], temp_dir=temp_dir)
        try:
            head_extra = {**plumbing, "RAY_ADDRESS": cluster.gcs_address, "RAY_NODE_TYPE_NAME": "headgroup",
                          "RAY_CLOUD_INSTANCE_ID": head_pod_name}
            cluster._launch(head_pod_name, "head", command, head_env, head_extra, head_res)
            cluster._wait(lambda: cluster._dashboard_ok(), "head", timeout_s)
            worker_plumbing = {k: v for k, v in plumbing.items() if k not in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")}
            for group in cluster_spec.get("workerGroupSpecs") or []:
                pod = group["template"]["spec"]
                ctr = pod["containers"][0]
                wparams = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
                res = node_resources(wparams, ctr)
                for i in range(int(group.get("replicas", group.get("minReplicas", 0)) or 0)):
                    pod_name = f"{name}-{group['groupName']}-worker-{i}"
                    env = container_env(ctr, pod, namespace, api, workdir, pod_name=f"{directory.name}/{pod_name}")
                    p = _free_ports(6, taken)
                    wcmd = [
                        sys.executable, "-c", JOIN_ON_LOOPBACK, "start", "--address", cluster.gcs_address, "--block",
                        "--node-ip-address", "127.0.0.1", "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                        "--metrics-export-port", str(p[2]), "--dashboard-agent-listen-port", str(p[3]),
                        "--dashboard-agent-grpc-port", str(p[4]), "--runtime-env-agent-port", str(p[5]),
                        "--object-store-memory", wparams.get("object-store-memory", str(OBJECT_STORE_BYTES)),
                        "--disable-usage-stats", *resource_flags(res), *passthrough_flags(wparams),
                    ]  # fmt: skip
                    extra = {**worker_plumbing, "RAY_NODE_TYPE_NAME": group["groupName"], "RAY_CLOUD_INSTANCE_ID": pod_name}
                    cluster._launch(pod_name, group["groupName"], wcmd, env, extra, res)
                    want = len(cluster.nodes)
                    cluster._wait(lambda: cluster.alive_node_count() >= want, pod_name, timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _launch(self, pod: str, group: str, command: list[str], env: PodEnv, extra: dict[str, str], res: dict) -> None:
        from llmplatform.stack.processes import start_process

        # process_env is the whole env: nothing of the test process leaks in beyond the image env
        full = env.process_env(extra)
        record = start_process(command, self.directory / "logs" / f"{pod}.log", env=_only(full))
        self.nodes.append(NodeProcess(pod=pod, group=group, record=record, env=env, resources=res))

    def _wait(self, check: Any, what: str, timeout_s: float) -> None:
        from llmplatform.stack.processes import is_ours, log_tail

        node = self.nodes[-1]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            if not is_ours(node.record):
                raise ClusterStartError(f"{what} of {self.name} exited while starting; last lines of {node.record.log}:\n{log_tail(node.record.log)}")
            time.sleep(0.5)
        raise ClusterStartError(f"{what} of {self.name} did not come up in {timeout_s:.0f}s; last lines of {node.record.log}:\n{log_tail(node.record.log)}")

    # ------------------------------------------------------------------ state

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def client_env(self) -> dict[str, str]:
        """Env for a Ray client of this cluster (Jobs API, ray.init, serve): loopback + its token."""
        from llmplatform.stack.ray_head import client_env

        return client_env(self.token_path)

    def _get(self, path: str, timeout: float = 5.0) -> Any:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(urllib.request.Request(self.dashboard_url + path, headers=self.auth_headers()), timeout=timeout) as resp:
            return json.loads(resp.read())

    def _dashboard_ok(self) -> bool:
        try:
            self._get("/api/version", timeout=2)
            return True
        except OSError:
            return False

    def alive_node_count(self) -> int:
        """Nodes the GCS reports ALIVE (through the dashboard's state API)."""
        try:
            data = self._get("/api/v0/nodes?limit=100")
        except (OSError, ValueError):
            return 0
        return sum(1 for n in data["data"]["result"]["result"] if n.get("state") == "ALIVE")

    def alive(self) -> bool:
        """Whether the head's process is still running (a dead head is a lost cluster)."""
        from llmplatform.stack.processes import is_ours

        return bool(self.nodes) and is_ours(self.nodes[0].record)

    def pids(self) -> list[int]:
        """Every live process of every node's group/session (raylets, GCS, workers, job drivers)."""
        from llmplatform.stack.processes import group_members

        return sorted({pid for node in self.nodes for pid in group_members(node.record.pgid)})

    # ------------------------------------------------------------------ stop

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every node (SIGTERM by group, SIGKILL after `timeout`), wait, remove Ray's temp dir."""
        from llmplatform.stack.processes import stop_groups
        from llmplatform.stack.ray_head import remove_temp_dir

        stop_groups([n.record for n in reversed(self.nodes)], timeout)
        remove_temp_dir(self.temp_dir)

    def kill(self) -> None:
        """SIGKILL every process of the cluster at once, like losing its nodes; reaps what is ours."""
        from llmplatform.stack.processes import _signal_group, group_is_ours, stop_groups

        records = [n.record for n in self.nodes if group_is_ours(n.record)]
        for record in records:
            _signal_group(record.pgid, signal.SIGKILL)
        stop_groups(records, timeout=1.0)  # reaps the leaders and finishes off anything that survived


def _only(env: Mapping[str, str]) -> dict[str, str | None]:
    """`start_process` layers env over os.environ; this masks every variable the pod does not have."""
    import os

    return {**{k: None for k in os.environ}, **env}
