"""`platformctl eval`: evaluation jobs that score models on held-out data and tag registered versions.

`eval submit` validates the spec (unknown scorers are refused before any model loads), runs the
job in this process (`llmplatform.evaluation.runner`: the platform's transformers engine, batched
greedy decoding), and prints one row per model with its mean scores and MLflow run.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from llmplatform.cli.models import TRACKING_OPTION, resolve_tracking_uri
from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit, emit_json

app = typer.Typer(help="Evaluation jobs: score base models and registered adapters on held-out data.", no_args_is_help=True)


@app.command("submit")
def submit(
    spec_path: str = typer.Argument(..., metavar="EVAL.yaml", help="Evaluation spec (YAML or JSON)."),
    model: List[str] = typer.Option([], "--model", "-m", help="Evaluate this model instead of the spec's `models` "
                                    "(llama2-tiny, NAME@ALIAS, NAME/VERSION); repeatable."),
    target: str = typer.Option("local", "--target", help="Where the job runs; only `local` (this process) so far."),
    tracking_uri: Optional[str] = TRACKING_OPTION,
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Generate answers for every model, score them, log one MLflow run per model (mean scores and a
    per-example table) and tag each registered version `eval.<dataset>.<metric>`."""
    from llmplatform.errors import EvalError
    from llmplatform.evaluation.runner import run_eval
    from llmplatform.specs import load_spec

    if target != "local":
        raise EvalError(f"--target {target!r}: evaluation jobs run only with --target local so far")
    spec = load_spec(spec_path, "eval")
    if model:
        spec = spec.model_copy(update={"models": list(model)})
    report = run_eval(spec, resolve_tracking_uri(tracking_uri))
    rows = report.rows()
    if output == OutputFormat.json:
        emit_json({"name": report.name, "dataset": report.dataset, "examples": report.examples, "models": rows})
        return
    metrics = [m.metric for m in spec.metrics]
    emit(rows, output, columns=["model", "version", "examples", *metrics, "run_id"])
    tagged = [f"{r['registered']}/{r['version']}" for r in rows if r["registered"]]
    if tagged:
        typer.echo(f"tagged eval.{report.dataset}.<metric> on: {', '.join(tagged)}")
