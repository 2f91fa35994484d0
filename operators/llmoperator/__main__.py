"""`python -m llmoperator`: run the operator (in-cluster config, or KUBECONFIG outside a cluster).

Watches the namespace in WATCH_NAMESPACE (the Deployment sets it to its own) or, when unset or
`*`, the whole cluster. Settings come from LLMOP_* env vars (see `OperatorConfig.from_env`);
LLMOP_CHECK_INTERVAL_S / LLMOP_REGISTRY_POLL_S set the health-check and alias-poll periods.
Registry aliases are resolved through MLflow (MLFLOW_TRACKING_URI) without downloading anything.
"""

from __future__ import annotations

import logging
import os
import sys

import kopf

from llmplatform.kube import connect
from llmplatform.errors import RegistryError

from llmoperator.handlers import Deps, configure, make_registry
from llmoperator.reconcile.common import OperatorConfig


def mlflow_alias_version(ref: str, tracking_uri: str | None) -> str:
    """Version behind `models:/NAME@ALIAS` via the MLflow registry API (metadata only)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from llmplatform.specs import REGISTRY_URI

    m = REGISTRY_URI.match(ref)
    if not m or not m.group("alias"):
        raise RegistryError(f"{ref!r} is not an alias reference models:/NAME@ALIAS")
    try:
        mv = MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")).get_model_version_by_alias(m.group("name"), m.group("alias"))
    except MlflowException as exc:
        raise RegistryError(f"cannot resolve {ref}: {exc}") from exc
    return str(mv.version)


def mlflow_job_progress(body: dict) -> dict | None:
    """{mlflowRunId, progress} of a FineTuneJob's MLflow run (tag platform.job_id), or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from llmoperator.reconcile.finetune import job_id, parse_finetune
    from llmoperator.reconcile.status import progress_text

    spec = parse_finetune(body)
    client = MlflowClient(spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        experiment = client.get_experiment_by_name(spec.mlflow.experiment)
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], f"tags.`platform.job_id` = '{job_id(body)}'", max_results=1)
        if not runs:
            return None
        run = runs[0]
        history = client.get_metric_history(run.info.run_id, "loss") if "loss" in run.data.metrics else []
    except MlflowException as exc:
        raise RegistryError(f"MLflow: {exc}") from exc
    step = history[-1].step if history else None
    return {"mlflowRunId": run.info.run_id, "progress": progress_text(step, spec.hyperparameters.max_steps)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LLMOP_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    deps = Deps(
        api=connect(),
        cfg=OperatorConfig.from_env(),
        resolve_version=mlflow_alias_version,
        job_progress=mlflow_job_progress,
        check_interval_s=float(os.environ.get("LLMOP_CHECK_INTERVAL_S", "30")),
        registry_poll_s=float(os.environ.get("LLMOP_REGISTRY_POLL_S", "30")),
    )
    registry = make_registry(deps)
    kopf.on.login(registry=registry)(kopf.login_via_client)
    settings = kopf.OperatorSettings()
    configure(settings)
    namespace = os.environ.get("WATCH_NAMESPACE", "*")
    scope = {"clusterwide": True} if namespace in ("", "*") else {"namespaces": [namespace]}
    kopf.run(registry=registry, settings=settings, standalone=True, liveness_endpoint="http://0.0.0.0:8080/healthz", **scope)
    return 0


if __name__ == "__main__":
    sys.exit(main())
