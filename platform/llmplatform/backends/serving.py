"""Serving deployments on a Ray cluster (the local stack or `--ray-address`): resolve, then deploy.

`deploy_spec` is what `platformctl serve deploy` runs: fill in the local stack's tracking server
when the spec uses the registry, connect, gather the target's facts (its accelerators, vLLM, the
registry versions), resolve the spec once, and hand the resolved plan to `serving.app.deploy`.
"""

from __future__ import annotations

from typing import Callable

from llmplatform.backends.facts import serve_facts
from llmplatform.resolve import Resolved, resolve
from llmplatform.specs import ServeSpec, parse_spec


def uses_registry(spec: ServeSpec) -> bool:
    return bool(spec.model.registry or spec.model.allow_dynamic_adapters
                or any(a.source.startswith("models:/") for a in spec.model.adapters))


def with_tracking_uri(spec: ServeSpec) -> ServeSpec:
    """The spec with $MLFLOW_TRACKING_URI or the local stack's MLflow server when it uses the
    registry and names none."""
    if spec.tracking_uri or not uses_registry(spec):
        return spec
    from llmplatform.backends.tracking import tracking_uri_for
    from llmplatform.errors import StackError

    try:
        return spec.model_copy(update={"tracking_uri": tracking_uri_for()})
    except StackError:
        if spec.model.registry or any(a.source.startswith("models:/") for a in spec.model.adapters):
            raise  # registry references need a registry; dynamic names just won't resolve
        return spec


def resolve_on_cluster(spec: ServeSpec | dict, target: str = "local", gpu_type: str | None = None) -> Resolved:
    """The resolved plan of `spec` on the connected Ray cluster (problems listed, not raised)."""
    from llmplatform.serving.app import cluster_accelerators

    spec = spec if isinstance(spec, ServeSpec) else parse_spec("serve", dict(spec), "<serve spec>")
    spec = with_tracking_uri(spec)
    accel = spec.resources.accelerator_resource or ("GPU" if spec.resources.gpus_per_shard > 0 or (gpu_type or spec.resources.gpu_type) else None)
    return resolve(spec, serve_facts(spec, target, gpu_type=gpu_type, cluster=cluster_accelerators(accel)))


def deploy_spec(spec: ServeSpec | dict, ray_address: str | None = None, *, target: str = "local", http_port: int | None = None,
                timeout_s: float | None = None, keep_failed: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Resolve `spec` against the cluster at `ray_address` (connected already if None) and deploy it;
    `progress` gets the deploy's snapshots (see `serving.app.deploy`)."""
    from llmplatform.serving import app

    app.connect(ray_address)
    plan = resolve_on_cluster(spec, target).require()
    kwargs = {"timeout_s": timeout_s} if timeout_s is not None else {}
    return app.deploy(plan, http_port=http_port, keep_failed=keep_failed, progress=progress, **kwargs)
