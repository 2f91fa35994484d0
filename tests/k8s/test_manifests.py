"""Every manifest we ship renders with `kubectl kustomize` and every object validates.

Built-in kinds: kubernetes-validate, strict, Kubernetes 1.32 (K8S_VERSION). ray.io/v1: KubeRay
v1.7.0's CRD schemas from ../shared/kuberay-crds (or $PLATFORM_KUBERAY_CRDS). monitoring.coreos.com/v1
(PodMonitor): Prometheus Operator 0.93.0's from ../shared/prometheus-operator-crds. Ours: the CRDs we
generate. Argo CD Applications: the subset schema in tests/k8s/schemas. Unknown fields fail.
Also: the committed CRDs match a fresh render from the pydantic specs, and they are structural.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from k8s_harness import REPO, close_schema

from llmoperator import crdgen

KUSTOMIZATIONS = ["manifests/overlays/dev", "manifests/overlays/prod", "manifests/clusters/dev", "manifests/clusters/prod", "manifests/crds",
                  "manifests/examples/model-cache", "manifests/monitoring", "jobs/k8s"]


def kustomize(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: it renders the kustomizations (kubectl kustomize); install kubectl >= 1.27")
    out = subprocess.run([kubectl, "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {path: kustomize(path) for path in KUSTOMIZATIONS}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_rendered_object_validates(path: str, rendered, manifest_validator) -> None:
    objects = rendered[path]
    assert objects, f"{path} rendered nothing"
    for obj in objects:
        manifest_validator.validate(obj)


def test_every_yaml_under_manifests_and_jobs_k8s_is_rendered(rendered) -> None:
    """No object goes unvalidated: each YAML file is part of some kustomization we render."""
    listed: set[Path] = set()
    for path in KUSTOMIZATIONS:
        listed |= _files_of(REPO / path)
    shipped = {p for p in (REPO / "manifests").rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert shipped - listed == set(), f"YAML not in any rendered kustomization (so never validated): {sorted(map(str, shipped - listed))}"


def _files_of(kdir: Path) -> set[Path]:
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    out: set[Path] = set()
    for res in k.get("resources", []):
        target = (kdir / res).resolve()
        out |= _files_of(target) if target.is_dir() else {target}
    return out


SAMPLES = sorted(p for p in (REPO / "jobs" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_every_sample_cr_validates_and_loads(path: Path, manifest_validator) -> None:
    """jobs/k8s: each CR passes its CRD schema and loads as the spec the CLI and operator use."""
    from llmplatform.specs import load_spec

    for doc in yaml.safe_load_all(path.read_text()):
        manifest_validator.validate(doc)
    assert load_spec(path).name == doc["metadata"]["name"]


def test_validator_rejects_unknown_fields_and_bad_values(manifest_validator, rendered) -> None:
    deployment = next(o for o in rendered["manifests/overlays/dev"] if o["kind"] == "Deployment")
    bad = {**deployment, "spec": {**deployment["spec"], "replicaz": 2}}
    with pytest.raises(AssertionError, match="replicaz"):
        manifest_validator.validate(bad)
    job = next(o for o in rendered["jobs/k8s"] if o["kind"] == "FineTuneJob")
    with pytest.raises(AssertionError, match="rnak|Additional properties"):
        manifest_validator.validate({**job, "spec": {**job["spec"], "lora": {"rnak": 8}}})
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}, "spec": {"entrypoint": "python x.py", "shutdownAfterJobFinish": True}}
    with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
        manifest_validator.validate(rayjob)


def test_kuberay_pin_and_server_side_apply(rendered) -> None:
    for env in ("dev", "prod"):
        apps = {a["metadata"]["name"]: a for a in rendered[f"manifests/clusters/{env}"] if a["kind"] == "Application"}
        kuberay = apps[f"kuberay-operator-{env}"]["spec"]
        assert kuberay["source"]["chart"] == "kuberay-operator" and kuberay["source"]["targetRevision"] == "1.7.0"
        waves = sorted((int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]), name) for name, a in apps.items())
        assert [n for _, n in waves][:3] == [f"llm-platform-crds-{env}", f"kuberay-operator-{env}", f"llm-platform-{env}"]
        for name in (f"llm-platform-crds-{env}", f"kuberay-operator-{env}"):
            assert "ServerSideApply=true" in apps[name]["spec"]["syncPolicy"]["syncOptions"]


def test_pods_are_restricted_with_probes_and_requests(rendered) -> None:
    for env in ("dev", "prod"):
        for obj in rendered[f"manifests/overlays/{env}"]:
            if obj["kind"] not in ("Deployment", "StatefulSet"):
                continue
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", obj["metadata"]["name"]
            for c in pod["containers"]:
                where = f"{env}/{obj['metadata']['name']}/{c['name']}"
                assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
                assert c["resources"]["requests"] and c["resources"]["limits"], where
                assert "readinessProbe" in c and "livenessProbe" in c, where


def test_operator_rbac_is_least_privilege(rendered) -> None:
    role = next(o for o in rendered["manifests/overlays/prod"] if o["kind"] == "Role" and o["metadata"]["name"] == "llm-operator")
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs[("ray.io", "rayclusters")] == {"get"}
    assert "delete" not in verbs[("llmplatform.io", "finetunejobs")] and "create" not in verbs[("llmplatform.io", "finetunejobs")]
    assert all("*" not in v for v in verbs.values()) and all("*" not in r for (_, r) in verbs)
    assert not any(o["kind"] == "ClusterRole" and any(set(r["verbs"]) - {"list", "watch"} for r in o["rules"]) for o in rendered["manifests/overlays/prod"])


# ---------------------------------------------------------------------------- our CRDs


@pytest.mark.parametrize("kind", list(crdgen.KINDS))
def test_committed_crds_match_the_specs(kind: str) -> None:
    path = REPO / "manifests" / "crds" / crdgen.filename(kind)
    assert path.is_file(), f"{path} missing: run `python -m llmoperator.crdgen manifests/crds`"
    assert path.read_text() == crdgen.render(kind), f"{path} is stale vs llmplatform.specs: run `python -m llmoperator.crdgen manifests/crds` and commit"


def _structural_problems(node: dict, where: str = "") -> list[str]:
    """What the API server's structural-schema check would reject (the parts we could emit)."""
    problems = []
    if "$ref" in node:
        problems.append(f"{where}: $ref")
    if node.get("additionalProperties") is False:
        problems.append(f"{where}: additionalProperties: false is forbidden in CRDs")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties together")
    if "type" not in node and not node.get("x-kubernetes-int-or-string") and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{where}: no type")
    for branch in node.get("anyOf", []):
        if set(branch) - {"type"} or (not node.get("x-kubernetes-int-or-string")):
            problems.append(f"{where}: anyOf outside the int-or-string pattern")
    if "default" in node:
        problems.append(f"{where}: default (the API server would write it into stored objects)")
    for name, sub in node.get("properties", {}).items():
        problems += _structural_problems(sub, f"{where}.{name}")
    if isinstance(node.get("items"), dict):
        problems += _structural_problems(node["items"], f"{where}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{where}{{}}")
    return problems


@pytest.mark.parametrize("kind", list(crdgen.KINDS))
def test_generated_crds_are_structural_with_status_and_columns(kind: str, manifest_validator) -> None:
    crd = crdgen.crd(kind)
    manifest_validator.validate(crd)  # a valid apiextensions.k8s.io/v1 object
    version = crd["spec"]["versions"][0]
    assert _structural_problems(version["schema"]["openAPIV3Schema"]) == []
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Age"] == ".metadata.creationTimestamp"
    assert {"FineTuneJob": ".status.progress", "ModelDeployment": ".status.servedVersion", "EvaluationJob": ".spec.dataset.name"}[kind] in columns.values()


def test_closing_keeps_maps_open() -> None:
    schema = close_schema(crdgen.crd("FineTuneJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    resources = schema["properties"]["spec"]["properties"]["resources"]
    assert resources["additionalProperties"] is False
    assert resources["properties"]["node_selector"]["additionalProperties"] == {"type": "string"}


def test_podmonitors_select_the_pods_the_operator_builds_on_their_named_ports(rendered) -> None:
    """manifests/monitoring: the serving PodMonitor scrapes /metrics on the `serve` port of the pods a
    ModelDeployment's RayService runs (by the operator's label), the operator's on its `metrics` port;
    the Grafana dashboard ships as a sidecar-labelled ConfigMap holding the JSON under manifests/."""
    import json

    from llmplatform.backends.k8s import model_deployment_cr
    from llmplatform.specs import parse_spec
    from llmoperator.reconcile import deployment
    from llmoperator.reconcile.common import LABEL_DEPLOYMENT, OperatorConfig

    objs = {(o["kind"], o["metadata"]["name"]): o for o in rendered["manifests/monitoring"]}
    cr = model_deployment_cr(parse_spec("serve", {"name": "chat", "model": {"base": "llama2-7b-chat"}}), "ns")
    cr["metadata"]["uid"] = "u-1"
    head = deployment.rayservice_for(cr, OperatorConfig(image="registry.example/llm-platform:1"), {})["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    serving = objs[("PodMonitor", "llm-platform-serving")]["spec"]
    assert serving["selector"]["matchExpressions"] == [{"key": LABEL_DEPLOYMENT, "operator": "Exists"}]
    assert LABEL_DEPLOYMENT in head["metadata"]["labels"]
    [endpoint] = serving["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for c in head["spec"]["containers"] for p in c.get("ports", [])}
    operator_pod = next(o for o in rendered["manifests/overlays/prod"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "llm-operator")
    op = objs[("PodMonitor", "llm-operator")]["spec"]
    assert op["selector"]["matchLabels"].items() <= operator_pod["spec"]["template"]["metadata"]["labels"].items()
    assert op["podMetricsEndpoints"][0]["port"] in {p["name"] for c in operator_pod["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    dashboards = objs[("ConfigMap", "llm-platform-grafana-dashboards")]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = REPO / "manifests" / "monitoring" / "dashboards" / "llm-platform-serving.json"
    assert json.loads(dashboards["data"]["llm-platform-serving.json"]) == json.loads(shipped.read_text())
