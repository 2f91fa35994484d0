"""ModelDeployment -> RayService -> a real Serve application, end to end (issue 15, flows 2, 3, 4).

The real operator (real MLflow registry lookups against the session's MLflow server) runs
against kmock; `KubeRayServe` (kuberay_serve.py) plays KubeRay: a local Ray cluster shaped by the
RayService, its serveConfigV2 deployed through Ray Serve's REST API, the status written back.
The tests talk to the application the way a user does: the `openai` SDK on the Serve proxy.
One deployment is shared by the flows, in order: auth (2), alias move under load (3), delete (4).
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from llmplatform.backends.k8s import model_deployment_cr
from llmplatform.kube import KubeApi, connect
from llmplatform.specs import parse_spec

from k8s_harness import OperatorThread, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

NS = "serve-e2e"
BASE = "llama2-tiny-random"  # the llama2-tiny family's random-init kind: built in seconds, no pretraining
REGISTERED = "support-bot-k8s"
API_KEY = "sk-k8s-e2e-0123456789abcdef"
KEYS_PATH = "/etc/llm-platform/api-keys/keys"  # the api-keys Secret's mount (contract with helper "secrets")
NAME = "chat"


# ---------------------------------------------------------------------------- helpers


def make_adapter(base_dir: str, out, seed: int):
    """A LoRA adapter with random non-zero weights: each seed visibly changes the greedy answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out


def register(uri: str, adapter_dir, base_dir: str) -> int:
    from mlflow import MlflowClient

    from llmplatform import registry

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("k8s-serve-e2e") or client.get_experiment(client.create_experiment("k8s-serve-e2e"))
    run = client.create_run(exp.experiment_id)
    version = registry.register_adapter(uri, REGISTERED, adapter_dir, run.info.run_id, {"base_model": BASE}, base_model_dir=base_dir)
    client.set_terminated(run.info.run_id)
    return version


def serve_url(kuberay, name: str) -> str:
    state = kuberay.state(name)
    assert state is not None and state.active is not None, f"RayService {name} has no active cluster"
    return f"http://127.0.0.1:{state.active.local.serve_port}"


def status_of(api: KubeApi, kind: str, name: str) -> dict:
    return (api.get(kind, NS, name) or {}).get("status") or {}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def api(cluster) -> KubeApi:
    return connect(host=cluster.url)


@pytest.fixture(scope="module")
def tiny_base() -> str:
    from llmplatform.basemodels import locate

    return locate(BASE)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("k8s-adapters")
    return {"v1": make_adapter(tiny_base, root / "v1", 11), "v2": make_adapter(tiny_base, root / "v2", 12)}


@pytest.fixture(scope="module")
def real_operator(cluster, mlflow_server):
    """The operator with the real MLflow registry lookup; the MLflow URI is the operator's own env
    (MLFLOW_TRACKING_URI in its Deployment), here passed to the lookup directly."""
    from llmoperator.__main__ import registry_lookup
    from llmoperator.handlers import Deps
    from llmoperator.reconcile.common import OperatorConfig

    deps = Deps(api=connect(host=cluster.url), cfg=OperatorConfig(image="registry.example/llm-platform:test", registry_poll_s=1.0),
                resolve_version=lambda ref, uri: registry_lookup(ref, uri or mlflow_server),
                check_interval_s=1.0, registry_poll_s=0.5, retry_delay_s=0.5)
    with OperatorThread(cluster.url, deps) as op:
        yield op


@pytest.fixture(scope="module")
def kuberay(api, real_operator, tmp_path_factory):
    from kuberay_serve import KubeRayServe

    with KubeRayServe(api, NS, tmp_path_factory.mktemp("kuberay-serve")) as k:
        yield k
    assert not k.errors, f"the harness hit errors: {k.errors[-3:]}"


@pytest.fixture(scope="module")
def deployment(api, kuberay, mlflow_server, adapters, tiny_base) -> dict:
    """ModelDeployment `chat`: llama2-tiny + adapter `support` following models:/support-bot-k8s@production
    (version 1), auth on with the key in the api-keys Secret; Ready through the harness."""
    from kuberay_serve import put_secret

    from llmplatform import registry
    from llmplatform.serving.ingress import hash_key

    v1 = register(mlflow_server, adapters["v1"], tiny_base)
    registry.promote(mlflow_server, REGISTERED, v1, "production")
    put_secret(api, NS, "llm-platform-mlflow", {"tracking-uri": mlflow_server})
    put_secret(api, NS, "llm-platform-api-keys", {"keys": f"sha256:{hash_key(API_KEY)}\n"})
    spec = parse_spec("serve", {
        "name": NAME, "engine": "hf", "max_model_len": 256,
        "model": {"base": BASE, "adapters": [{"name": "support", "source": f"models:/{REGISTERED}@production"}]},
        "auth": {"enabled": True, "api_keys_file": KEYS_PATH, "api_keys_env": None},
        "limits": {"default_max_tokens": 8, "request_timeout_s": 60},
        "registry_poll_s": 1.0,
    })
    t0 = time.monotonic()
    api.create(model_deployment_cr(spec, NS))
    ready = eventually(lambda: status_of(api, "ModelDeployment", NAME) if status_of(api, "ModelDeployment", NAME).get("phase") == "Ready" else None,
                       timeout=300, what="ModelDeployment Ready")
    return {"v1": v1, "ready": ready, "startup_s": time.monotonic() - t0}


def client(url: str, key: str | None):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "no-key", max_retries=0, timeout=60)


def keys_mounted(api: KubeApi) -> bool:
    """Whether the operator mounts the api-keys Secret at KEYS_PATH's directory in the Ray pods."""
    rs = api.get("RayService", NS, NAME) or {}
    head = rs.get("spec", {}).get("rayClusterConfig", {}).get("headGroupSpec", {}).get("template", {}).get("spec", {})
    mounts = [m.get("mountPath") for c in head.get("containers", []) for m in c.get("volumeMounts") or []]
    return os.path.dirname(KEYS_PATH) in mounts


# ---------------------------------------------------------------------------- flows


def test_flow2_auth_through_the_rayservice(api: KubeApi, kuberay, deployment: dict, manifest_validator) -> None:
    import openai

    rs = api.get("RayService", NS, NAME)
    manifest_validator.validate(rs)  # the status the harness wrote passes KubeRay's own schema
    st = rs["status"]
    assert st["serviceStatus"] == "Running" and st["numServeEndpoints"] == 1
    assert {c["type"]: c["status"] for c in st["conditions"]} == {"Ready": "True", "UpgradeInProgress": "False"}
    assert st["activeServiceStatus"]["applicationStatuses"][NAME]["status"] == "RUNNING"
    md = deployment["ready"]
    assert md["rayClusterName"] == st["activeServiceStatus"]["rayClusterName"] == kuberay.state(NAME).active.name
    assert md["servedVersion"] == f"{REGISTERED}/{deployment['v1']}"
    url = serve_url(kuberay, NAME)
    with pytest.raises(openai.AuthenticationError):  # 401 without the key
        client(url, None).chat.completions.create(model=f"{BASE}:support", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert keys_mounted(api), "the operator must mount the llm-platform-api-keys Secret at /etc/llm-platform/api-keys"
    answer = client(url, API_KEY).chat.completions.create(model=f"{BASE}:support", messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=4, temperature=0)
    assert answer.choices[0].message.content is not None and answer.usage.completion_tokens >= 1


def test_flow3_alias_move_updates_in_place_under_load(api: KubeApi, kuberay, deployment: dict, mlflow_server, adapters, tiny_base) -> None:
    from llmplatform import registry

    url = serve_url(kuberay, NAME)
    c = client(url, API_KEY)
    model = f"{BASE}:support"
    ask = dict(model=model, messages=[{"role": "user", "content": "Tell me about the weather"}], max_tokens=8, temperature=0)

    def version() -> int | None:
        cards = {m.id: m for m in c.models.list().data}
        return getattr(cards[model], "version", None) or (cards[model].model_extra or {}).get("version")

    assert str(version()) == str(deployment["v1"])
    before = c.chat.completions.create(**ask).choices[0].message.content
    cluster_before = kuberay.state(NAME).active
    deploys_before = len(kuberay.deploys)

    stop, results, failures = threading.Event(), [], []

    def load() -> None:  # light load: one client per thread, bounded by `stop` and a count
        lc = client(url, API_KEY)
        for _ in range(400):
            if stop.is_set():
                return
            try:
                r = lc.chat.completions.create(**{**ask, "max_tokens": 4})
                results.append(r.choices[0].message.content)
            except Exception as exc:  # any failed request fails the flow
                body = getattr(getattr(exc, "response", None), "text", "")
                failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc} {body[:500]}")

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        v2 = register(mlflow_server, adapters["v2"], tiny_base)
        registry.promote(mlflow_server, REGISTERED, v2, "production")
        eventually(lambda: str(version()) == str(v2), timeout=180, what="the new version served")
        eventually(lambda: status_of(api, "RayService", NAME).get("activeServiceStatus", {}).get("applicationStatuses", {})
                   .get(NAME, {}).get("status") == "RUNNING", timeout=120, what="application RUNNING again")
        time.sleep(1.0)  # a few requests on the new replicas too
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    assert not failures, (f"{len(failures)} of {len(results) + len(failures)} requests failed during the switch: {failures[:3]}\n"
                          f"errors in the Serve logs:\n{serve_log_errors(cluster_before.local)}")
    assert len(results) >= 4
    after = c.chat.completions.create(**ask).choices[0].message.content
    assert after != before, "the greedy answer did not change with the new adapter version"
    state = kuberay.state(NAME)
    assert state.active is cluster_before and state.pending is None, "a serve-config change must not start a new cluster"
    assert len(kuberay.deploys) > deploys_before and kuberay.deploys[-1] == (NAME, cluster_before.name)
    md = eventually(lambda: status_of(api, "ModelDeployment", NAME) if status_of(api, "ModelDeployment", NAME).get("servedVersion") == f"{REGISTERED}/{v2}" else None,
                    timeout=30, what="servedVersion v2")
    assert md["phase"] == "Ready"


def test_flow4_deleting_the_modeldeployment_leaves_nothing(api: KubeApi, kuberay, deployment: dict) -> None:
    state = kuberay.state(NAME)
    clusters = list(state.history)
    assert clusters and all(c.local.alive() for c in [state.active])
    api.delete("ModelDeployment", NS, NAME)
    eventually(lambda: api.get("RayService", NS, NAME) is None, timeout=60, what="RayService gone")
    eventually(lambda: NAME in kuberay.stopped, timeout=120, what="the harness tore the RayService down")
    for c in clusters:
        assert not c.local.alive(), f"cluster {c.name} still alive"
        assert api.get("RayCluster", NS, c.name) is None
        left = [pid for pid in c.local.pids() if _running(pid)]
        assert not left, f"processes of {c.name} still running: {left}"


def serve_log_errors(local, limit: int = 60) -> str:
    """ERROR lines and tracebacks of the cluster's Serve logs (proxy, controller, replicas), for failure messages."""
    lines = []
    for path in sorted(local.temp_dir.glob("session_*/logs/serve/*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if re.search(r"\bERROR\b|Traceback|Error\b|died|killed", line):
                lines.append(f"{path.name}: {line[:400]}")
    return "\n".join(lines[-limit:]) or "(none)"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
