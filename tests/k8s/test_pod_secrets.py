"""What every Ray pod gets besides its resources: the Hugging Face token, the model cache, the API keys.

The operator's settings (`LLMOP_*`) apply to every CR; a CR's `cluster:` section overrides them for
its own pods. Every object built here is validated against KubeRay v1.7.0's CRD schema.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from llmplatform.backends.k8s import finetune_job_cr, model_deployment_cr
from llmplatform.errors import SpecError
from llmplatform.resolve import Resolved
from llmplatform.specs import parse_spec

from llmoperator.reconcile import deployment, finetune
from llmoperator.reconcile.common import OperatorConfig

CFG = OperatorConfig(image="registry.example/llm-platform:1.2.3")
KEYS_FILE = "/etc/llm-platform/api-keys/keys"


def ft_cr(**spec) -> dict:
    body = {"name": "job-a", "base_model": "llama2-7b", "data": {"train": "s3://b/train.jsonl"},
            "resources": {"workers": 2, "gpus_per_worker": 1}, **spec}
    cr = finetune_job_cr(parse_spec("finetune", body), "ns")
    cr["metadata"]["uid"] = "u-1"
    return cr


def md_cr(**spec) -> dict:
    body = {"name": "chat", "model": {"base": "llama2-7b-chat"}, "tensor_parallel": 2, "resources": {"gpus_per_shard": 1}, **spec}
    cr = model_deployment_cr(parse_spec("serve", body), "ns")
    cr["metadata"]["uid"] = "u-2"
    return cr


def pods(obj: dict) -> dict[str, dict]:
    """{'head': pod spec, 'worker': pod spec} of a RayJob or RayService."""
    cluster = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"], "worker": cluster["workerGroupSpecs"][0]["template"]["spec"]}


def env_of(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def mounts_of(pod: dict) -> dict[str, dict]:
    return {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}


def volumes_of(pod: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod["volumes"]}


def plan_of(rs: dict) -> Resolved:
    return Resolved.from_dict(yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"])


# ---------------------------------------------------------------------------- operator settings


def test_settings_come_from_the_operators_env_with_the_documented_defaults() -> None:
    default = OperatorConfig.from_env({})
    assert (default.hf_token_secret, default.model_cache_pvc, default.api_keys_secret) == ("llm-platform-hf-token", None, "llm-platform-api-keys")
    cfg = OperatorConfig.from_env({"LLMOP_HF_TOKEN_SECRET": "hf", "LLMOP_MODEL_CACHE_PVC": "models-rwx", "LLMOP_API_KEYS_SECRET": "keys"})
    assert (cfg.hf_token_secret, cfg.model_cache_pvc, cfg.api_keys_secret) == ("hf", "models-rwx", "keys")
    assert OperatorConfig.from_env({"LLMOP_MODEL_CACHE_PVC": ""}).model_cache_pvc is None


# ---------------------------------------------------------------------------- FineTuneJob -> RayJob


def test_every_training_pod_gets_the_hf_token_from_an_optional_secret_and_no_cache_by_default(manifest_validator) -> None:
    rayjob = finetune.rayjob_for(ft_cr(), CFG)
    manifest_validator.validate(rayjob)
    for role, pod in pods(rayjob).items():
        env = env_of(pod)
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "llm-platform-hf-token", "key": "token", "optional": True}}, role
        assert "HF_HOME" not in env, role  # no cache PVC: the image's default cache on the pod's disk
        assert set(volumes_of(pod)) == {"dshm"} and set(mounts_of(pod)) == {"dshm"}, role


def test_a_model_cache_pvc_is_mounted_in_every_training_pod_with_hf_home_on_it(manifest_validator) -> None:
    cfg = OperatorConfig(model_cache_pvc="llm-models")
    rayjob = finetune.rayjob_for(ft_cr(), cfg)
    manifest_validator.validate(rayjob)
    for role, pod in pods(rayjob).items():
        assert volumes_of(pod)["model-cache"] == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "llm-models"}}, role
        assert mounts_of(pod)["model-cache"]["mountPath"] == "/models", role
        assert env_of(pod)["HF_HOME"] == {"name": "HF_HOME", "value": "/models/huggingface"}, role
        assert "api-keys" not in volumes_of(pod), role  # training never gets the serving keys


def test_the_crs_cluster_section_beats_the_operator_settings(manifest_validator) -> None:
    cfg = OperatorConfig(hf_token_secret="cluster-hf", model_cache_pvc="cluster-models")
    rayjob = finetune.rayjob_for(ft_cr(cluster={"hf_token_secret": "team-a-hf", "model_cache_pvc": "team-a-models"}), cfg)
    manifest_validator.validate(rayjob)
    for pod in pods(rayjob).values():
        assert env_of(pod)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "team-a-hf"
        assert volumes_of(pod)["model-cache"]["persistentVolumeClaim"]["claimName"] == "team-a-models"
    # what the CR leaves unset stays the operator's
    only_pvc = finetune.rayjob_for(ft_cr(cluster={"model_cache_pvc": "team-a-models"}), cfg)
    assert env_of(pods(only_pvc)["worker"])["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cluster-hf"


@pytest.mark.parametrize("field", ["hf_token_secret", "model_cache_pvc", "api_keys_secret"])
def test_a_bad_object_name_in_cluster_is_a_spec_error_naming_the_field(field: str) -> None:
    cr = ft_cr()
    cr["spec"]["cluster"] = {field: "Team_A/HF"}
    with pytest.raises(SpecError) as err:
        finetune.rayjob_for(cr, CFG)
    text = str(err.value)
    assert f"cluster.{field}" in text and "DNS-1123" in text and "Team_A/HF" in text
    cr["spec"]["cluster"] = {field: "team-a.hf-token"}  # dots are fine in Secret and PVC names
    finetune.rayjob_for(cr, CFG)


# ---------------------------------------------------------------------------- ModelDeployment -> RayService


def test_auth_on_mounts_the_api_key_secret_on_every_serving_pod_and_the_plan_names_its_file(manifest_validator) -> None:
    rs = deployment.rayservice_for(md_cr(auth={"enabled": True}), CFG, {})
    manifest_validator.validate(rs)
    for role, pod in pods(rs).items():  # the head too: Serve may place the ingress replica there
        assert volumes_of(pod)["api-keys"]["secret"] == {"secretName": "llm-platform-api-keys", "items": [{"key": "keys", "path": "keys"}]}, role
        assert "optional" not in volumes_of(pod)["api-keys"]["secret"], role  # auth without keys must not start silently
        assert mounts_of(pod)["api-keys"] == {"name": "api-keys", "mountPath": "/etc/llm-platform/api-keys", "readOnly": True}, role
        assert env_of(pod)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True, role
        # the usage store's URL (the platform's Postgres) from the platform Secret, if it has one
        assert env_of(pod)["PLATFORM_USAGE_DB"]["valueFrom"] == {"secretKeyRef": {"name": "llm-platform-mlflow", "key": "usage-db", "optional": True}}, role
    plan = plan_of(rs)
    assert plan["api_keys_file"] == KEYS_FILE and plan.source("api_keys_file") == "target"


def test_auth_off_mounts_no_keys_and_the_plan_names_no_file(manifest_validator) -> None:
    rs = deployment.rayservice_for(md_cr(), CFG, {})
    manifest_validator.validate(rs)
    assert all("api-keys" not in volumes_of(pod) for pod in pods(rs).values())
    assert plan_of(rs)["api_keys_file"] is None


def test_serving_overrides_and_a_spec_keys_file_that_is_not_in_the_pods(manifest_validator) -> None:
    cfg = OperatorConfig(model_cache_pvc="llm-models")
    cr = md_cr(auth={"enabled": True, "api_keys_file": "~/my-keys.txt"},
               cluster={"api_keys_secret": "chat-keys", "hf_token_secret": "chat-hf", "model_cache_pvc": "chat-models"})
    rs = deployment.rayservice_for(cr, cfg, {})
    manifest_validator.validate(rs)
    for pod in pods(rs).values():
        assert volumes_of(pod)["api-keys"]["secret"]["secretName"] == "chat-keys"
        assert volumes_of(pod)["model-cache"]["persistentVolumeClaim"]["claimName"] == "chat-models"
        assert env_of(pod)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "chat-hf"
        assert env_of(pod)["HF_HOME"]["value"] == "/models/huggingface"
    plan = plan_of(rs)
    # a path on the deploying machine means nothing in a pod: the mounted Secret's file replaces it, and says so
    assert plan["api_keys_file"] == KEYS_FILE and "~/my-keys.txt" in plan.values["api_keys_file"].reason
    assert plan.spec.auth.api_keys_file == "~/my-keys.txt"  # the user's spec itself is not rewritten


def test_turning_auth_on_changes_the_cluster_not_only_the_serve_config() -> None:
    off = deployment.rayservice_for(md_cr(), CFG, {})
    on = deployment.rayservice_for(md_cr(auth={"enabled": True}), CFG, {})
    assert deployment.update_for(off, on)[0] == "cluster"  # new pods with the key volume


def test_the_validator_rejects_a_misspelled_volume(manifest_validator) -> None:
    """The checks above mean something: KubeRay's schema knows the pod template's volumes."""
    rs = copy.deepcopy(deployment.rayservice_for(md_cr(auth={"enabled": True}), CFG, {}))
    pods(rs)["worker"]["volumes"][-1]["secret"]["secretNam"] = pods(rs)["worker"]["volumes"][-1]["secret"].pop("secretName")
    with pytest.raises(AssertionError, match="secretNam"):
        manifest_validator.validate(rs)


def test_the_cli_preview_and_the_operator_name_the_same_keys_file() -> None:
    from llmplatform.resolve import Facts, resolve

    cr = md_cr(auth={"enabled": True})
    preview = resolve(deployment.parse_serve(cr), Facts(target="k8s"))  # `platformctl spec resolve --target k8s`
    assert preview["api_keys_file"] == plan_of(deployment.rayservice_for(cr, CFG, {}))["api_keys_file"] == KEYS_FILE
