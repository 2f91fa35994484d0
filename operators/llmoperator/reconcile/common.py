"""What every KubeRay object we build shares: operator settings, labels, owner references, pods.

`OperatorConfig` holds the cluster-side choices a spec doesn't make (image, Secrets, TTL,
deadlines), read from the operator's environment by `OperatorConfig.from_env`; a CR's `cluster:`
section overrides its Secret and cache names for that CR's pods (`OperatorConfig.for_cr`). The pod
helpers build Ray head/worker pod templates that pass Pod Security "restricted": non-root, no
privilege escalation, all capabilities dropped, RuntimeDefault seccomp, and an in-memory /dev/shm
that Ray's object store needs.

Every Ray container, head and workers alike, gets the same Secrets and volumes: the driver of a
fine-tune and Serve's application build and ingress replicas run on the head and load tokenizers
there, and the Serve ingress replica (the one that checks API keys) may land on any pod. So:
`HF_TOKEN` from the Hugging Face token Secret (an optional reference: without it public models
still load), the model-cache PVC at /models with `HF_HOME=/models/huggingface` when one is
configured (one claim shared by every pod of the cluster, so it must be ReadWriteMany when the
pods can land on several nodes), and, for a deployment with `auth.enabled`, the API-key Secret
as a read-only volume at /etc/llm-platform/api-keys (not optional: auth without keys would
refuse every request, so a missing Secret keeps the pods in ContainerCreating with an event
naming it). Pods mount Secrets themselves; the operator never reads one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from llmplatform.resolve import K8S_API_KEYS_FILE, K8S_PLATFORM_HOME

GROUP = "llmplatform.io"
API_VERSION = f"{GROUP}/v1alpha1"
RAY_API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"
MANAGED_BY = "llmoperator"
LABEL_FINETUNE = f"{GROUP}/finetunejob"
LABEL_EVALUATION = f"{GROUP}/evaluationjob"
LABEL_DEPLOYMENT = f"{GROUP}/modeldeployment"
ANNOTATION_CANCEL = f"{GROUP}/cancel"
ANNOTATION_DEADLINE = f"{GROUP}/active-deadline-seconds"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_IMAGE = "ghcr.io/llm-platform/llm-platform:0.1.0"
POD_PLATFORM_HOME = K8S_PLATFORM_HOME  # PLATFORM_HOME inside every Ray pod (one constant, in resolve)
HF_TOKEN_KEY = "token"  # key of the Hugging Face token Secret
USAGE_DB_KEY = "usage-db"  # key of the platform Secret (`mlflow_secret`) with the usage store's URL
MODEL_CACHE_MOUNT = "/models"  # the model-cache PVC inside every Ray pod
POD_HF_HOME = f"{MODEL_CACHE_MOUNT}/huggingface"
# The API-key Secret (key `keys`: one plain key or sha256:<hex> hash per line) is mounted where
# resolve tells the ingress on k8s to read it: /etc/llm-platform/api-keys/keys.
POD_API_KEYS_FILE = K8S_API_KEYS_FILE
API_KEYS_MOUNT, API_KEYS_KEY = POD_API_KEYS_FILE.rsplit("/", 1)


@dataclass(frozen=True)
class OperatorConfig:
    """Cluster-side settings for every object the operator creates."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    mlflow_secret: str = "llm-platform-mlflow"  # key `tracking-uri`
    object_store_secret: str = "llm-platform-object-store"  # AWS_* / MLFLOW_S3_ENDPOINT_URL keys
    service_account: str = "llm-platform-workload"
    ttl_seconds_after_finished: int = 600  # keep a finished cluster 10 min for log reading
    backoff_limit: int = 0  # a RayJob retry is a whole new cluster; Ray Train retries in place
    active_deadline_seconds: int = 7 * 24 * 3600
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    registry_poll_s: float | None = None  # LLMOP_REGISTRY_POLL_S: overrides every ServeSpec.registry_poll_s
    image_has_vllm: bool = False  # LLMOP_IMAGE_HAS_VLLM: the platform image has vLLM (engine auto -> vllm)
    hf_token_secret: str = "llm-platform-hf-token"  # key `token` -> HF_TOKEN (optional reference)
    model_cache_pvc: str | None = None  # mounted at /models, HF_HOME=/models/huggingface; ReadWriteMany
    api_keys_secret: str = "llm-platform-api-keys"  # key `keys`, mounted for serving with auth on
    extra_labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if env is None else env
        base = cls()

        def pick(name: str, default: Any) -> Any:
            value = env.get(f"LLMOP_{name}")
            return default if value in (None, "") else type(default)(value)

        return cls(
            image=pick("IMAGE", base.image),
            image_pull_policy=pick("IMAGE_PULL_POLICY", base.image_pull_policy),
            mlflow_secret=pick("MLFLOW_SECRET", base.mlflow_secret),
            object_store_secret=pick("OBJECT_STORE_SECRET", base.object_store_secret),
            service_account=pick("WORKLOAD_SERVICE_ACCOUNT", base.service_account),
            ttl_seconds_after_finished=pick("TTL_SECONDS_AFTER_FINISHED", base.ttl_seconds_after_finished),
            backoff_limit=pick("BACKOFF_LIMIT", base.backoff_limit),
            active_deadline_seconds=pick("ACTIVE_DEADLINE_SECONDS", base.active_deadline_seconds),
            registry_poll_s=float(env["LLMOP_REGISTRY_POLL_S"]) if env.get("LLMOP_REGISTRY_POLL_S") else None,
            image_has_vllm=str(env.get("LLMOP_IMAGE_HAS_VLLM", "false")).lower() in ("1", "true", "yes"),
            hf_token_secret=pick("HF_TOKEN_SECRET", base.hf_token_secret),
            model_cache_pvc=env.get("LLMOP_MODEL_CACHE_PVC") or None,
            api_keys_secret=pick("API_KEYS_SECRET", base.api_keys_secret),
        )

    def for_cr(self, cluster: Any) -> "OperatorConfig":
        """These settings with a CR's `cluster:` section (a `ClusterSpec`) applied: what it sets wins."""
        names = ("hf_token_secret", "model_cache_pvc", "api_keys_secret")
        return replace(self, **{n: getattr(cluster, n) for n in names if getattr(cluster, n) is not None})


def owner_reference(owner: Mapping[str, Any]) -> dict:
    """A controller owner reference: deleting the owner garbage-collects the child (and its cluster)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(owner: Mapping[str, Any], label_key: str, cfg: OperatorConfig) -> dict:
    meta = owner["metadata"]
    labels = {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "llm-platform",
        label_key: meta["name"],
        **cfg.extra_labels,
    }
    return {"name": meta["name"], "namespace": meta["namespace"], "labels": labels, "ownerReferences": [owner_reference(owner)]}


def secret_env(cfg: OperatorConfig) -> tuple[list[dict], list[dict]]:
    """(env, envFrom): the MLflow URI, object-store credentials and Hugging Face token come from
    Secrets, never the spec; HF_HOME points into the model cache when there is one."""
    env = [
        {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": cfg.mlflow_secret, "key": "tracking-uri"}}},
        # optional: a cluster without the Secret still runs public models (and the tiny one)
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": cfg.hf_token_secret, "key": HF_TOKEN_KEY, "optional": True}}},
        {"name": "PLATFORM_HOME", "value": POD_PLATFORM_HOME},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        # the usage store's SQLAlchemy URL (the platform's Postgres); optional: without the key the
        # ingress writes SQLite under PLATFORM_HOME in the pod, which does not outlive it
        {"name": "PLATFORM_USAGE_DB", "valueFrom": {"secretKeyRef": {"name": cfg.mlflow_secret, "key": USAGE_DB_KEY, "optional": True}}},
    ]
    if cfg.model_cache_pvc:
        env.append({"name": "HF_HOME", "value": POD_HF_HOME})
    env_from = [{"secretRef": {"name": cfg.object_store_secret, "optional": True}}]
    return env, env_from


def pod_volumes(cfg: OperatorConfig, api_keys: bool = False) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts) of a Ray container: /dev/shm in memory, the model-cache PVC when
    configured, and the API-key Secret (read-only) when `api_keys` (serving with auth on)."""
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if cfg.model_cache_pvc:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cfg.model_cache_pvc}})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT})
    if api_keys:
        # not subPath: a subPath mount never sees a rotated Secret; the ingress re-reads the file when it changes
        volumes.append({"name": "api-keys", "secret": {"secretName": cfg.api_keys_secret, "items": [{"key": API_KEYS_KEY, "path": API_KEYS_KEY}]}})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    return volumes, mounts


def _security() -> tuple[dict, dict]:
    pod = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100, "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
    return pod, container


def quantity_gi(gb: float) -> str:
    """Memory in whole GiB, rounded up (Kubernetes quantities must be exact)."""
    return f"{max(1, math.ceil(gb))}Gi"


def pod_template(
    *,
    container_name: str,
    cfg: OperatorConfig,
    cpu: str,
    memory: str,
    gpus: int = 0,
    node_selector: Mapping[str, str] | None = None,
    tolerations: list[dict] | None = None,
    ports: list[dict] | None = None,
    labels: Mapping[str, str] | None = None,
    api_keys: bool = False,
) -> dict:
    """A Ray pod template: platform image, Secrets as env, the model cache and (`api_keys`) the
    API-key Secret as volumes, requests == limits, restricted security."""
    env, env_from = secret_env(cfg)
    volumes, mounts = pod_volumes(cfg, api_keys)
    pod_sec, ctr_sec = _security()
    resources: dict[str, dict[str, Any]] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if gpus:
        resources["requests"][GPU_RESOURCE] = gpus
        resources["limits"][GPU_RESOURCE] = gpus
    container: dict[str, Any] = {
        "name": container_name,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "env": env,
        "envFrom": env_from,
        "resources": resources,
        "securityContext": ctr_sec,
        "volumeMounts": mounts,
    }
    if ports:
        container["ports"] = ports
    spec: dict[str, Any] = {
        "serviceAccountName": cfg.service_account,
        "securityContext": pod_sec,
        "containers": [container],
        "volumes": volumes,
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    tolerations = list(tolerations or [])
    if gpus and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        spec["tolerations"] = tolerations
    template: dict[str, Any] = {"spec": spec}
    if labels:
        template["metadata"] = {"labels": dict(labels)}
    return template


def tolerations_from(spec_tolerations: list[Any]) -> list[dict]:
    """Spec `Toleration` models -> Kubernetes tolerations (unset fields left out)."""
    out = []
    for t in spec_tolerations:
        item = {"key": t.key, "operator": t.operator}
        if t.value is not None:
            item["value"] = t.value
        if t.effect is not None:
            item["effect"] = t.effect
        out.append(item)
    return out


HEAD_PORTS = [
    {"name": "gcs", "containerPort": 6379},
    {"name": "dashboard", "containerPort": 8265},
    {"name": "client", "containerPort": 10001},
]


def cr_source(kind: str, cr: Mapping[str, Any]) -> str:
    """`Kind namespace/name`, how errors about a custom resource name it."""
    return f"{kind} {cr['metadata'].get('namespace', '')}/{cr['metadata']['name']}"


def parse_cr_spec(cr: Mapping[str, Any], kind: str, spec_kind: str):
    """A `kind` CR's spec validated by the spec model the CLI uses (`spec_kind`: finetune, eval,
    serve), its name from metadata.name; raises SpecError naming every bad field."""
    from llmplatform.specs import parse_spec

    body = dict(cr.get("spec") or {})
    body.setdefault("name", cr["metadata"]["name"])
    return parse_spec(spec_kind, body, cr_source(kind, cr))

