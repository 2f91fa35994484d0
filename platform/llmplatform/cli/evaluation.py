"""`platformctl eval`: evaluation jobs that score models on held-out data and tag registered versions.

`eval submit` validates the spec (unknown scorers are refused before any model loads), runs the
job in this process (`--target local`; `llmplatform.evaluation.runner`: the platform's transformers
engine, batched greedy decoding) or as a Ray job running the same runner (`--target ray`: the
cluster at RAY_ADDRESS, or the local stack's when it is unset; waits for it, `eval list` lists
the jobs), and prints one row per model with its mean scores and MLflow run. A scorer
that raised on some examples is reported (index, line, exception, on stderr) and counted in the
ERRORS column; its mean is over the examples that scored. A metric that raised on every example
makes the command exit 1 after the report (that model is not tagged). `--target k8s` creates an
EvaluationJob (the operator runs it as a KubeRay RayJob; its status carries each model's MLflow
run and mean scores once it ends) and returns once the operator has picked it up.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from llmplatform.cli.models import TRACKING_OPTION, resolve_tracking_uri
from llmplatform.cli.output import (CONTEXT_OPTION, KUBECONFIG_OPTION, NAMESPACE_OPTION, OPERATOR_TIMEOUT_OPTION, OUTPUT_OPTION, OutputFormat,
                                    emit, emit_json)

app = typer.Typer(help="Evaluation jobs: score base models and registered adapters on held-out data.", no_args_is_help=True)


@app.command("submit")
def submit(
    spec_path: str = typer.Argument(..., metavar="EVAL.yaml", help="Evaluation spec (YAML or JSON)."),
    model: List[str] = typer.Option([], "--model", "-m", help="Evaluate this model instead of the spec's `models` "
                                    "(llama2-tiny, NAME@ALIAS, NAME/VERSION); repeatable."),
    target: str = typer.Option("local", "--target", help="local: in this process; ray: a Ray job on the cluster at "
                               "RAY_ADDRESS, or on the local stack (`platformctl up`) when RAY_ADDRESS is unset; k8s: an "
                               "EvaluationJob resource (the operator runs it)."),
    timeout_s: float = typer.Option(3600, "--timeout", help="With --target ray: seconds to wait for the job."),
    tracking_uri: Optional[str] = TRACKING_OPTION,
    output: OutputFormat = OUTPUT_OPTION,
    namespace: str = NAMESPACE_OPTION,
    kubeconfig: str = KUBECONFIG_OPTION,
    context: str = CONTEXT_OPTION,
    operator_timeout: float = OPERATOR_TIMEOUT_OPTION,
) -> None:
    """Generate answers for every model, score them, log one MLflow run per model (mean scores and a
    per-example table) and tag each registered version `eval.<dataset>.<metric>`. A scorer that raises on
    an example is counted and reported, not fatal; one that raises on every example fails that model."""
    from llmplatform.errors import EvalError
    from llmplatform.evaluation.runner import run_eval
    from llmplatform.specs import load_spec

    if target not in ("local", "ray", "k8s"):
        raise EvalError(f"--target {target!r}: evaluation jobs run with --target local (this process), ray or k8s")
    spec = load_spec(spec_path, "eval")
    if model:
        spec = spec.model_copy(update={"models": list(model)})
    if target == "k8s":
        from llmplatform.backends import k8s

        row = k8s.submit_evaluation(spec, namespace=namespace, kubeconfig=kubeconfig, context=context, operator_timeout_s=operator_timeout)
        emit(row, output, text=f"EvaluationJob {row['namespace']}/{row['name']} created ({row['phase']}); follow it with "
                               f"`platformctl eval list --target k8s -n {row['namespace']}` (scores in its status.results when it ends)")
        return
    if target == "ray":
        _submit_ray(spec, tracking_uri, timeout_s, output)
        return
    report = run_eval(spec, resolve_tracking_uri(tracking_uri))
    print_report(report.name, report.dataset, report.examples, report.rows(), [m.metric for m in spec.metrics], output)


def _submit_ray(spec, tracking_uri: Optional[str], timeout_s: float, output: OutputFormat) -> None:
    """Submit the runner as a Ray job, wait for it, print its report like a local run."""
    import os

    from llmplatform.errors import EvalError
    from llmplatform.evaluation import ray_job

    if os.environ.get("RAY_ADDRESS"):
        from llmplatform.backends.targets import backend_for

        backend = backend_for("ray")
    else:
        from llmplatform.backends.local import local_backend

        backend = local_backend()
    record = ray_job.submit(backend, spec, resolve_tracking_uri(tracking_uri or backend.tracking_uri))
    typer.echo(f"evaluation job {record.id} submitted to {backend.address}", err=True)
    record = ray_job.wait(backend, record, timeout_s)
    report = record.metrics
    if report.get("models"):
        print_report(report["name"], report["dataset"], report["examples"], report["models"],
                     [m.metric for m in spec.metrics], output, failed_ok=True)
    if record.state != "succeeded":
        raise EvalError(f"evaluation job {record.id} {record.state}: {record.reason or 'see its Ray job log'}")


def print_report(name: str, dataset: str, examples: int, rows: list[dict], metrics: list[str], output: OutputFormat,
                 failed_ok: bool = False) -> None:
    """The report a user reads (one row per model), the scorer failures on stderr; EvalError (exit 1)
    after it when a model failed, unless the caller reports that itself (`failed_ok`)."""
    from llmplatform.errors import EvalError

    if output == OutputFormat.json:
        emit_json({"name": name, "dataset": dataset, "examples": examples, "models": rows})
    else:
        shown = [{**r, "errors": ", ".join(f"{m}={n}" for m, n in r["errors"].items() if n) or None} for r in rows]
        emit(shown, output, columns=["model", "version", "examples", *metrics, "errors", "run_id"])
        tagged = [f"{r['registered']}/{r['version']}" for r in rows if r["registered"] and not r["error"]]
        if tagged:
            typer.echo(f"tagged eval.{dataset}.<metric> on: {', '.join(tagged)}")
        for line in failure_lines(rows, examples, dataset):
            typer.echo(line, err=True)
    failed = [r["error"] for r in rows if r["error"]]
    if failed and not failed_ok:
        raise EvalError("; ".join(failed))


@app.command("list")
def list_cmd(output: OutputFormat = OUTPUT_OPTION,
             target: str = typer.Option("ray", "--target", help="ray: jobs submitted with --target ray; k8s: the EvaluationJobs of a namespace."),
             namespace: str = NAMESPACE_OPTION, kubeconfig: str = KUBECONFIG_OPTION, context: str = CONTEXT_OPTION) -> None:
    """Evaluation jobs submitted with --target ray, newest first (running ones refreshed); --target k8s: EvaluationJobs."""
    from llmplatform.backends.targets import backend_of
    from llmplatform.evaluation import ray_job

    if target == "k8s":
        from llmplatform.backends import k8s

        rows = k8s.list_evaluations(namespace=namespace, kubeconfig=kubeconfig, context=context)
        for row in rows:
            row["scores"] = "; ".join(f"{r['model']}: " + ", ".join(f"{k}={v:.4g}" for k, v in (r.get("metrics") or {}).items())
                                      for r in row.get("results") or []) or None
        emit(rows, output, columns=["name", "namespace", "phase", "dataset", "models", "scores", "reason", "created"])
        return

    rows = []
    for record in ray_job.list_records():
        if not record.terminal and record.address:
            record = ray_job.refresh(backend_of(record), record)
        report = record.metrics or {}
        rows.append({"id": record.id, "name": record.name, "state": record.state, "target": record.target,
                     "dataset": report.get("dataset") or record.spec.get("dataset", {}).get("name"),
                     "models": ", ".join(record.spec.get("models", [])), "submitted": record.submitted,
                     "reason": record.reason, "report": report or None})
    emit(rows, output, columns=["id", "name", "state", "dataset", "models", "submitted", "reason"])


def failure_lines(rows: list[dict], examples: int, dataset: str, per_metric: int = 5) -> list[str]:
    """What a user reads about raising scorers: the first few failures of each metric and model
    (rows as `EvalReport.rows()` makes them), and over how many examples each affected mean was taken."""
    from llmplatform.evaluation.runner import ScoreFailure

    lines = []
    for r in rows:
        for metric, count in r["errors"].items():
            if not count:
                continue
            failures = [ScoreFailure(**f) for f in r["failures"] if f["metric"] == metric]
            lines += [f"warning: {f.describe()}" for f in failures[:per_metric]]
            if count > per_metric:
                lines.append(f"warning: ... and {count - per_metric} more failures of metric {metric!r} "
                             f"for model {r['model']!r} (all in --output json and the run's eval/{dataset}.json)")
            scored = r["scored"][metric]
            lines.append(f"note: {r['model']} {metric}: "
                         + (f"mean over the {scored} of {examples} examples that scored ({count} raised)"
                            if scored else "no example scored; no value"))
    return lines
