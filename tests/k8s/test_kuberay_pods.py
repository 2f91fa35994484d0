"""The KubeRay harness gives a pod's processes what a kubelet would (kuberay_pods.py), against kmock.

The e2e flows trust it to pass Secrets, ConfigMaps and volumes through exactly; these checks make a
harness that dropped or invented something fail here first, in a second, without Ray.
"""

from __future__ import annotations

import base64

import pytest

from kuberay_pods import ContainerConfigError, container_env

NS = "pods-ns"


@pytest.fixture(scope="module")
def api(cluster):
    from kubernetes import client

    from llmplatform.kube import connect

    kube = connect(host=cluster.url)
    core = client.CoreV1Api(kube._client)
    core.create_namespaced_secret(NS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": NS},
                                       "data": {"token": base64.b64encode(b"hf_secret").decode()}})
    core.create_namespaced_config_map(NS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": NS},
                                           "data": {"LEVEL": "debug", "app.yaml": "a: 1\n"}})
    return kube


def pod(container: dict, volumes: list[dict] | None = None) -> dict:
    return {"containers": [container], "volumes": volumes or []}


def test_env_from_secrets_configmaps_and_literals_in_kubelet_order(api, tmp_path) -> None:
    ctr = {"name": "ray-worker", "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}, {"secretRef": {"name": "absent", "optional": True}}],
           "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                   {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": True}}},
                   {"name": "GREETING", "value": "level=$(CFG_LEVEL)"}]}
    got = container_env(ctr, pod(ctr), NS, api, tmp_path)
    assert got.env == {"CFG_LEVEL": "debug", "CFG_app.yaml": "a: 1\n", "HF_TOKEN": "hf_secret", "GREETING": "level=debug"}
    assert got.process_env()["HF_TOKEN"] == "hf_secret" and "OPTIONAL" not in got.process_env()


@pytest.mark.parametrize("ref, named", [({"name": "nope", "key": "token"}, "Secret pods-ns/nope"),
                                        ({"name": "hf", "key": "nokey"}, "has no key 'nokey'")])
def test_missing_secret_or_key_refuses_the_pod_naming_it(api, tmp_path, ref, named) -> None:
    ctr = {"name": "ray-head", "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}]}
    with pytest.raises(ContainerConfigError, match="CreateContainerConfigError") as err:
        container_env(ctr, pod(ctr), NS, api, tmp_path)
    assert named in str(err.value) and "HF_TOKEN" in str(err.value)


def test_volumes_are_directories_pvcs_shared_paths_in_env_rewritten(api, tmp_path) -> None:
    ctr = {"name": "ray-worker", "env": [{"name": "HF_HOME", "value": "/models/huggingface"}, {"name": "PLATFORM_HOME", "value": "/home/ray/.llm-platform"},
                                         {"name": "KEYS", "value": "/etc/keys/token"}, {"name": "PLAIN", "value": "/usr/bin"}],
           "volumeMounts": [{"name": "cache", "mountPath": "/models"}, {"name": "keys", "mountPath": "/etc/keys", "readOnly": True},
                            {"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "scratch", "mountPath": "/dev/shm"}]}
    volumes = [{"name": "cache", "persistentVolumeClaim": {"claimName": "model-cache"}}, {"name": "keys", "secret": {"secretName": "hf"}},
               {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "app.yaml", "path": "conf/app.yaml"}]}},
               {"name": "scratch", "emptyDir": {"medium": "Memory"}}]
    one = container_env(ctr, pod(ctr, volumes), NS, api, tmp_path, pod_name="c1/worker-0")
    two = container_env(ctr, pod(ctr, volumes), NS, api, tmp_path, pod_name="c2/worker-0")
    assert one.mounts["/models"] == two.mounts["/models"] == tmp_path / "pvc" / NS / "model-cache"  # a PVC outlives pods and clusters
    assert one.mounts["/dev/shm"] != two.mounts["/dev/shm"] and one.home != two.home  # emptyDir and home are per pod
    assert (one.mounts["/etc/keys"] / "token").read_text() == "hf_secret"
    assert (one.mounts["/etc/cfg"] / "conf" / "app.yaml").read_text() == "a: 1\n" and not (one.mounts["/etc/cfg"] / "LEVEL").exists()
    assert one.env["HF_HOME"] == str(tmp_path / "pvc" / NS / "model-cache" / "huggingface")
    assert one.env["PLATFORM_HOME"] == str(one.home / ".llm-platform") and one.env["KEYS"] == str(one.mounts["/etc/keys"] / "token")
    assert one.env["PLAIN"] == "/usr/bin"
