"""`python -m llmoperator`: run the operator (in-cluster config, or KUBECONFIG outside a cluster).

Watches the namespace in WATCH_NAMESPACE (the Deployment sets it to its own) or, when unset or
`*`, the whole cluster. Settings come from LLMOP_* env vars (see `OperatorConfig.from_env`);
LLMOP_CHECK_INTERVAL_S sets the health-check period; each ModelDeployment re-resolves its registry
aliases every `registry_poll_s` of its spec (LLMOP_REGISTRY_POLL_S overrides them all; the timer
ticks every LLMOP_REGISTRY_TICK_S, default 5). Registry references are looked up in MLflow
(MLFLOW_TRACKING_URI), metadata only; LLMOP_IMAGE_HAS_VLLM=true says the image has vLLM.
Prometheus metrics on LLMOP_METRICS_PORT (default 8081; manifests/monitoring scrapes it).
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


def registry_lookup(ref: str, tracking_uri: str | None) -> dict:
    """Version, base model and LoRA rank behind a registry reference (metadata only)."""
    from llmplatform import registry

    try:
        return registry.lookup(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), ref)
    except RegistryError:
        raise
    except Exception as exc:  # MLflow unreachable or refusing: retried by the handler
        raise RegistryError(f"cannot look up {ref}: {exc}") from exc


def mlflow_job_progress(body: dict) -> dict | None:
    """{mlflowRunId, progress} of a FineTuneJob's newest MLflow run (tag platform.job_id), with
    {registeredModel, registeredVersion} once that run has finished and registered its adapter (a sweep: its best
    trial's); or None."""
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
        # A resubmitted job (same name and spec: same job id) logs into a new run: the newest is this one.
        runs = client.search_runs([experiment.experiment_id], f"tags.`platform.job_id` = '{job_id(body)}'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            return None
        run = runs[0]
        history = client.get_metric_history(run.info.run_id, "loss") if "loss" in run.data.metrics else []
        # The entrypoint registers the adapter before the run ends, so a finished run has its version;
        # a sweep's parent registers its best trial's, from that trial's child run.
        registered_from = run.data.tags.get("sweep.best_run_id") or run.info.run_id
        versions = client.search_model_versions(f"run_id = '{registered_from}'") if run.info.status == "FINISHED" else []
    except MlflowException as exc:
        raise RegistryError(f"MLflow: {exc}") from exc
    step = history[-1].step if history else None
    out = {"mlflowRunId": run.info.run_id, "progress": progress_text(step, spec.hyperparameters.max_steps)}
    if versions:
        newest = max(versions, key=lambda v: int(v.version))
        out.update(registeredModel=newest.name, registeredVersion=str(newest.version))
    return out


def mlflow_eval_results(body: dict) -> dict | None:
    """{results: [{model, runId, status, metrics[, error]}]} of an EvaluationJob, from its MLflow runs
    (tag platform.job_id), once they have ended; or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from llmoperator.reconcile.evaluation import job_id, parse_evaluation

    spec = parse_evaluation(body)
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"))
    prefix = f"eval.{spec.dataset.name}."
    try:
        experiment = client.get_experiment_by_name(spec.mlflow.experiment)
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], f"tags.`platform.job_id` = '{job_id(body)}'", max_results=100)
    except MlflowException as exc:
        raise RegistryError(f"MLflow: {exc}") from exc
    results = []
    for run in sorted(runs, key=lambda r: r.data.tags.get("eval.model", "")):
        metrics = {k[len(prefix):]: v for k, v in run.data.metrics.items() if k.startswith(prefix) and not k.endswith(".errors")}
        row = {"model": run.data.tags.get("eval.model", run.info.run_name), "runId": run.info.run_id, "status": run.info.status, "metrics": metrics}
        if run.data.tags.get("eval.error"):
            row["error"] = run.data.tags["eval.error"][:1000]
        results.append(row)
    return {"results": results} if results and all(r["status"] in ("FINISHED", "FAILED") for r in results) else None


def serve_metrics(port: int, addr: str = "0.0.0.0", registry=None, lookup=registry_lookup):
    """Prometheus metrics of the operator process on `addr:port` (/metrics: process_*, python_*,
    `platform_registry_lookups_total{result}`); returns (the counted `lookup`, the HTTP server)."""
    from prometheus_client import REGISTRY, Counter, start_http_server

    from llmplatform.serving.metrics import counted_lookups

    registry = REGISTRY if registry is None else registry
    lookups = Counter("platform_registry_lookups", "Model-registry lookups by result (ok, failed).", ["result"], registry=registry)
    for result in ("ok", "failed"):
        lookups.labels(result)
    server, _thread = start_http_server(port, addr, registry=registry)
    return counted_lookups(lookup, lookups), server


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LLMOP_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    deps = Deps(
        api=connect(),
        cfg=OperatorConfig.from_env(),
        resolve_version=serve_metrics(int(os.environ.get("LLMOP_METRICS_PORT", "8081")))[0],
        job_progress=mlflow_job_progress,
        eval_results=mlflow_eval_results,
        check_interval_s=float(os.environ.get("LLMOP_CHECK_INTERVAL_S", "30")),
        registry_poll_s=float(os.environ.get("LLMOP_REGISTRY_TICK_S", "5")),
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
