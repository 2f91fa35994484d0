"""`platformctl doctor`: what this machine has and lacks for the platform, each with a fix.

Every check returns a `Check` (ok / warning / error, what was found, how to fix it); nothing
raises. Errors stop the local stack or a job from working (a port held by another process, no
torch); warnings name optional pieces that are missing (no GPU, no vLLM, no kubeconfig). Checks
read package metadata rather than importing heavy packages, so doctor stays quick; only the
CUDA check imports torch, and only when a GPU device node exists.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from llmplatform import paths, processinfo
from llmplatform.stack.ports import HOST, port_is_free

OK, WARNING, ERROR = "ok", "warning", "error"
MIN_PYTHON = (3, 10)  # pyproject.toml requires-python
# (component, default port, `platformctl up` flag): the ports `up` binds unless told otherwise.
STACK_PORTS = (("Ray GCS", 6379, "--ray-port"), ("Ray dashboard", 8265, "--dashboard-port"), ("MLflow server", 5000, "--mlflow-port"))
DISK_ERROR_GIB = 1.0  # less than this: even the tiny demo model cannot be written
DISK_WARN_GIB = 20.0  # llama2-7b in fp16 is ~13 GiB, plus adapters and merged copies
OPERATOR_LABEL = "app.kubernetes.io/name=llm-operator"  # manifests/base/operator/deployment.yaml
CRD_NAMES = ("finetunejobs.llmplatform.io", "modeldeployments.llmplatform.io")
log = logging.getLogger(__name__)
INSTALL_FIX = "run `make install` (or `pip install -c constraints/cpu.txt -e .`) in the repository"


@dataclass(frozen=True)
class Check:
    """One finding: `status` ok|warning|error, `detail` what was found, `fix` what to do (empty when ok)."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def dist_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None (no import of the package)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python(version: Sequence[int] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(str(v) for v in version)
    if tuple(version[:2]) < MIN_PYTHON:
        return Check("python", ERROR, f"Python {text} at {sys.executable}",
                     f"use Python {'.'.join(map(str, MIN_PYTHON))} or newer (e.g. `uv venv -p 3.12`), then reinstall")
    return Check("python", OK, f"Python {text} at {sys.executable}")


def check_package(dist: str, purpose: str, version: Callable[[str], str | None] = dist_version) -> Check:
    """A required package (torch, ray, mlflow) is installed: error with the install command if not."""
    found = version(dist)
    if found is None:
        return Check(dist, ERROR, f"{dist} is not installed ({purpose})", INSTALL_FIX)
    return Check(dist, OK, f"{dist} {found}")


def check_vllm(find_spec: Callable[[str], object] = importlib.util.find_spec, version: Callable[[str], str | None] = dist_version) -> Check:
    """vLLM is the optional fast engine; the HF engine serves without it."""
    if find_spec("vllm") is None:
        return Check("vllm", WARNING, "vLLM is not importable in this environment; serving uses the HF engine",
                     "optional: `make .venv-vllm` builds the vLLM (CPU) tier; on GPU hosts the image in "
                     "docker/ has it (constraints/gpu.txt)")
    return Check("vllm", OK, f"vllm {version('vllm') or '(version unknown)'} importable")


def check_gpu(gpu_nodes: Callable[[], bool] | None = None, cuda_available: Callable[[], bool] | None = None) -> Check:
    """A GPU device node exists and torch sees CUDA. No node: a warning (CPU runs tiny models only)."""
    from llmplatform import cpus

    gpu_nodes = gpu_nodes or cpus.gpu_present
    if not gpu_nodes():
        return Check("gpu", WARNING, "no GPU visible: fine-tuning and serving run on CPU (llama2-tiny only)",
                     "on a GPU host install the NVIDIA driver (`nvidia-smi` must work) and check CUDA_VISIBLE_DEVICES; "
                     "real Llama 2 sizes need a GPU or a cluster (`--target k8s`)")
    cuda_available = cuda_available or _torch_cuda_available
    if not cuda_available():
        return Check("gpu", WARNING, "a GPU device exists but torch does not see CUDA (CPU build of torch, or no driver)",
                     "install a CUDA build of torch (constraints/gpu.txt) and check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
    return Check("gpu", OK, "GPU visible to torch (CUDA available)")


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def check_port(component: str, port: int, flag: str | None, own_pids: Iterable[int] = (), host: str = HOST) -> Check:
    """Free, or held by this user's local stack: ok. Held by another process: error naming it.
    `flag` is the `platformctl up` option that moves the component elsewhere (None: no such flag)."""
    name = f"port {port}"
    if port_is_free(port, host):
        return Check(name, OK, f"{host}:{port} is free ({component})")
    owner = processinfo.port_owner(port)
    own = set(own_pids)
    if owner is not None and (owner.pid in own or own & set(owner.ancestors)):
        return Check(name, OK, f"{host}:{port} is held by this home's local stack (pid {owner.pid}, {owner.name})")
    who = f"pid {owner.pid} ({owner.describe()})" if owner is not None else "a process this user cannot inspect"
    elsewhere = f"start the stack elsewhere: `platformctl up {flag} <free port>`" if flag else "use another port"
    return Check(name, ERROR, f"{host}:{port} ({component}) is taken by {who}",
                 f"stop that process{f' (kill {owner.pid})' if owner is not None else ''}, or {elsewhere}")


def check_disk(cache: Path | None = None, usage: Callable[[str], tuple] = shutil.disk_usage) -> Check:
    """Free space where the model cache lives (the nearest existing parent when it is not created yet)."""
    cache = cache or paths.model_cache()
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gib = usage(str(probe))[2] / 2**30
    detail = f"{free_gib:.1f} GiB free for the model cache {cache}"
    fix = "free space there, or point PLATFORM_MODEL_CACHE at a larger disk"
    if free_gib < DISK_ERROR_GIB:
        return Check("disk", ERROR, detail, fix)
    if free_gib < DISK_WARN_GIB:
        return Check("disk", WARNING, detail + f" (enough for llama2-tiny; llama2-7b needs ~{DISK_WARN_GIB:.0f} GiB)", fix)
    return Check("disk", OK, detail)


def kubeconfig_files(env: dict | None = None) -> list[Path]:
    """Existing kubeconfig files: those $KUBECONFIG lists, else ~/.kube/config."""
    env = os.environ if env is None else env
    listed = [Path(p).expanduser() for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    candidates = listed or [Path(env.get("HOME", "~")).expanduser() / ".kube" / "config"]
    return [p for p in candidates if p.is_file()]


def check_kubeconfig(env: dict | None = None) -> Check:
    env = os.environ if env is None else env
    if env.get("KUBERNETES_SERVICE_HOST"):
        return Check("kubeconfig", OK, "running in a pod: in-cluster service account")
    files = kubeconfig_files(env)
    if not files:
        where = env.get("KUBECONFIG") or "~/.kube/config"
        return Check("kubeconfig", WARNING, f"no kubeconfig ({where} not found): `--target k8s` is unavailable; the local stack works",
                     "only for clusters: set KUBECONFIG or --kubeconfig, or create one (e.g. `kind create cluster`)")
    return Check("kubeconfig", OK, f"kubeconfig {', '.join(map(str, files))}")


def check_operator(kubeconfig: Check, probe: Callable[[], tuple[list[str], list[str]]] | None = None) -> Check:
    """The CRDs are installed and an operator Deployment runs. Skipped (warning) without a kubeconfig."""
    if kubeconfig.status != OK:
        return Check("operator", WARNING, "not checked: no kubeconfig", "see the kubeconfig check")
    try:
        crds, operators = (probe or _probe_cluster)()
    except Exception as exc:  # any client or network failure is a finding here, not a crash
        return Check("operator", WARNING, f"cluster not reachable: {type(exc).__name__}: {str(exc)[:200]}",
                     "check the context (`kubectl cluster-info`), or pass --context / set PLATFORM_K8S_CONTEXT")
    missing = [c for c in CRD_NAMES if c not in crds]
    if missing:
        return Check("operator", WARNING, f"CRDs missing: {', '.join(missing)}",
                     "install them: `kubectl apply -k manifests/crds`, then the operator: `kubectl apply -k manifests/overlays/dev`")
    if not operators:
        return Check("operator", WARNING, "CRDs installed but no operator Deployment (label " + OPERATOR_LABEL + ")",
                     "deploy it: `kubectl apply -k manifests/overlays/dev` (or prod)")
    return Check("operator", OK, f"operator running: {', '.join(operators)}")


def _probe_cluster() -> tuple[list[str], list[str]]:
    """(installed CRD names, namespace/name of operator Deployments with ready replicas)."""
    from kubernetes import client

    from llmplatform.kube import api_client

    api = api_client()
    crds = [c.metadata.name for c in client.ApiextensionsV1Api(api).list_custom_resource_definition(_request_timeout=5).items]
    deps = client.AppsV1Api(api).list_deployment_for_all_namespaces(label_selector=OPERATOR_LABEL, _request_timeout=5).items
    return crds, [f"{d.metadata.namespace}/{d.metadata.name}" for d in deps if (d.status.ready_replicas or 0) > 0]


def own_stack_pids(home: Path | None = None) -> list[int]:
    """PIDs of the components this PLATFORM_HOME's `platformctl up` started (empty when none)."""
    from llmplatform.stack.state import read_state

    try:
        comps = read_state(home or paths.platform_home())
    except Exception:  # an unreadable state file: doctor then treats every holder as foreign
        return []
    return [c.process.pid for c in comps.values()]


def ports_to_check(wanted: Sequence[int]) -> list[tuple[str, int, str | None]]:
    """(component, port, `up` flag) for each wanted port: the stack's own where it is a default port."""
    if not wanted:
        return list(STACK_PORTS)
    known = {port: (component, flag) for component, port, flag in STACK_PORTS}
    return [(known[p][0], p, known[p][1]) if p in known else ("requested", p, None) for p in wanted]


def run_checks(ports: Sequence[tuple[str, int, str | None]] = STACK_PORTS, *, cluster: bool = True) -> list[Check]:
    """All checks, in the order a user fixes them."""
    own = own_stack_pids()
    log.info("checking ports %s (processes of this home's stack: %s)", [p for _, p, _ in ports], own or "none")
    kube = check_kubeconfig()
    checks = [
        check_python(),
        check_package("torch", "training and the HF engine"),
        check_package("ray", "jobs and serving"),
        check_package("mlflow", "tracking and the registry"),
        check_vllm(),
        check_gpu(),
        check_disk(),
        *[check_port(component, port, flag, own) for component, port, flag in ports],
        kube,
    ]
    if cluster:
        checks.append(check_operator(kube))
    return checks


def exit_code(checks: Iterable[Check]) -> int:
    """1 when any check is an error, else 0 (warnings are fine)."""
    return 1 if any(c.status == ERROR for c in checks) else 0
