"""`platformctl eval`: evaluation jobs that score models on held-out data and tag registered versions.

`eval submit` validates the spec (unknown scorers are refused before any model loads), runs the
job in this process (`llmplatform.evaluation.runner`: the platform's transformers engine, batched
greedy decoding), and prints one row per model with its mean scores and MLflow run. A scorer
that raised on some examples is reported (index, line, exception, on stderr) and counted in the
ERRORS column; its mean is over the examples that scored. A metric that raised on every example
makes the command exit 1 after the report (that model is not tagged).
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
    per-example table) and tag each registered version `eval.<dataset>.<metric>`. A scorer that raises on
    an example is counted and reported, not fatal; one that raises on every example fails that model."""
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
    else:
        metrics = [m.metric for m in spec.metrics]
        shown = [{**r, "errors": ", ".join(f"{m}={n}" for m, n in r["errors"].items() if n) or None} for r in rows]
        emit(shown, output, columns=["model", "version", "examples", *metrics, "errors", "run_id"])
        tagged = [f"{r['registered']}/{r['version']}" for r in rows if r["registered"] and not r["error"]]
        if tagged:
            typer.echo(f"tagged eval.{report.dataset}.<metric> on: {', '.join(tagged)}")
        for line in failure_lines(report):
            typer.echo(line, err=True)
    if report.failed():
        raise EvalError("; ".join(report.failed()))


def failure_lines(report, per_metric: int = 5) -> list[str]:
    """What a user reads about raising scorers: the first few failures of each metric and model,
    and over how many examples each affected mean was taken."""
    lines = []
    for r in report.results:
        for metric, count in r.errors().items():
            if not count:
                continue
            failures = [f for f in r.failures if f.metric == metric]
            lines += [f"warning: {f.describe()}" for f in failures[:per_metric]]
            if count > per_metric:
                lines.append(f"warning: ... and {count - per_metric} more failures of metric {metric!r} "
                             f"for model {r.target.label!r} (all in --output json and the run's eval/{report.dataset}.json)")
            scored = r.scored()[metric]
            lines.append(f"note: {r.target.label} {metric}: "
                         + (f"mean over the {scored} of {report.examples} examples that scored ({count} raised)"
                            if scored else "no example scored; no value"))
    return lines
