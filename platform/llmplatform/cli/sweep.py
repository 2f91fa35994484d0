"""`platformctl finetune sweep`: a hyperparameter sweep of a fine-tuning spec on Ray Tune.

Every `--param PATH=V1,V2` is checked against the spec, every trial's spec (the base with the
trial's values) is validated and resolved, and the data is validated, all before any compute.
The sweep is then one Ray job (`llmplatform.training.sweep`) recorded like a fine-tune job, so
`platformctl finetune status/logs/cancel ID` work on it; this command follows it with a live
table of trials (rich on a terminal, a line per change otherwise, JSON at the end with
`--output json`). Ctrl-C cancels the sweep and every trial.
"""

from __future__ import annotations

import json
import time

import typer

from llmplatform.backends import records
from llmplatform.backends.base import JobRecord
from llmplatform.cli.output import OUTPUT_OPTION, LiveTable, OutputFormat, emit_json
from llmplatform.errors import JobError

TRIAL_COLUMNS = ["trial", "state", "step", "loss", "eval_loss"]
MAX_SWEEP_JSON = 120_000  # bytes: one argument of the job's command line (Linux allows 128 KiB)


def trial_rows(log_text: str) -> list[dict]:
    """The latest `trial` event of each trial in a sweep's job log, by trial number."""
    from llmplatform.backends.ray_jobs import parse_events

    latest: dict[int, dict] = {}
    for ev in parse_events(log_text):
        if ev.get("kind") == "trial":
            latest[int(ev["trial"])] = {**latest.get(int(ev["trial"]), {}), **{k: v for k, v in ev.items() if k != "kind"}}
    return [latest[i] for i in sorted(latest)]


def sweep_result(log_text: str) -> dict | None:
    from llmplatform.backends.ray_jobs import parse_events

    found = [ev for ev in parse_events(log_text) if ev.get("kind") == "result" and "best_trial" in ev]
    return found[-1] if found else None


def _rounded(rows: list[dict], params: list[str]) -> list[dict]:
    out = []
    for row in rows:
        r = {**row, **{p: row.get("params", {}).get(p) for p in params}}
        out.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return out


def follow(record: JobRecord, params: list[str], output: OutputFormat, poll_s: float = 1.0) -> tuple[JobRecord, list[dict], dict | None]:
    """Poll the sweep's job until it ends, drawing the trials table; Ctrl-C cancels the sweep."""
    from llmplatform.backends.targets import backend_of

    backend = backend_of(record)
    table = LiveTable(f"sweep {record.id}", TRIAL_COLUMNS[:1] + params + TRIAL_COLUMNS[1:], enabled=output != OutputFormat.json)
    try:
        while True:
            record = records.save(backend.refresh(record))
            text = backend.client().get_job_logs(record.id)
            rows = trial_rows(text)
            table.update(_rounded(rows, params))
            if record.terminal:
                return record, rows, sweep_result(text)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        table.close()
        typer.echo(f"\ncancelling sweep {record.id} and its trials ...", err=True)
        record = records.save(backend.cancel(record))
        raise JobError(f"sweep {record.id} {record.state}: {record.reason}") from None
    finally:
        table.close()


def sweep(
    spec_path: str = typer.Argument(..., metavar="SPEC.yaml", help="The base fine-tuning spec (YAML or JSON)."),
    param: list[str] = typer.Option(..., "--param", "-p", help="PATH=V1,V2,...: a spec field and the values to try, e.g. "
                                                               "hyperparameters.learning_rate=1e-4,3e-4 (repeat for more fields)."),
    search: str = typer.Option("grid", "--search", help="grid (every combination) or random (--trials draws)."),
    trials: int = typer.Option(None, "--trials", help="random search: how many trials.", min=1),
    metric: str = typer.Option("eval_loss", "--metric", help="What picks the best trial: eval_loss, eval_perplexity, eval_token_accuracy or loss."),
    mode: str = typer.Option("min", "--mode", help="min or max of --metric."),
    max_concurrent: int = typer.Option(2, "--max-concurrent", help="Trials running at once.", min=1),
    early_stop: str = typer.Option("none", "--early-stop", help="asha: stop trials that rank badly at eval steps (eval.every_n_steps, then x2, x4 ...)."),
    target: str = typer.Option("local", "--target", "-t", help="local (the `platformctl up` stack) or ray (RAY_ADDRESS Jobs API)."),
    detach: bool = typer.Option(False, "--detach", help="Print the sweep's job id and return; follow it with `platformctl finetune status ID`."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Run trials of SPEC over --param values on Ray Tune; register only the best trial's adapter."""
    from llmplatform.backends.facts import finetune_facts
    from llmplatform.backends.targets import backend_for
    from llmplatform.cli.finetune import validate_before_submit
    from llmplatform.resolve import resolve
    from llmplatform.specs import load_spec, resolve_local_paths
    from llmplatform.training.sweep_params import build_plan
    from llmplatform.training.trainer import new_job_id

    if target not in ("local", "ray"):
        raise JobError(f"--target {target!r}: sweeps run on local or ray for now (on k8s, run them with --target ray against the cluster's Jobs API)")
    base = resolve_local_paths(load_spec(spec_path, "finetune"))
    sweep_plan, specs = build_plan(param, base, search=search, trials=trials, metric=metric, mode=mode, max_concurrent=max_concurrent, early_stop=early_stop)
    facts = finetune_facts(base, target)
    base_plan = resolve(base, facts).require()
    plans = [resolve(s, finetune_facts(s, target)).require().to_dict() for s in specs]  # every trial resolved before any compute
    validate_before_submit(base, target)
    record = JobRecord(id=new_job_id(base.model_copy(update={"name": f"{base.name[:33]}-sweep"})), name=base.name, target=target,
                       spec=base.model_dump(mode="json"), registered_model=base.mlflow.registered_model_name)
    doc = json.dumps({"sweep": sweep_plan.to_dict(), "plans": plans}, separators=(",", ":"))
    if len(doc) > MAX_SWEEP_JSON:
        raise JobError(f"{len(specs)} trials are too many for one sweep job's command line ({len(doc)} bytes of resolved plans, "
                       f"at most {MAX_SWEEP_JSON}); use --search random --trials N with a smaller N, or fewer --param values")
    record = records.save(backend_for(target).submit(base_plan, record, module="llmplatform.training.sweep", extra=["--sweep-json", doc]))
    names = [p.path for p in sweep_plan.params]
    if output != OutputFormat.json:
        typer.echo(f"sweep {record.id}: {len(specs)} trials, {max_concurrent} at a time, submitted to {target} ({record.address})")
        typer.echo(f"mlflow parent run: {record.run_url}")
    if detach:
        if output == OutputFormat.json:
            emit_json(record.to_dict())
        return
    record, rows, result = follow(record, names, output)
    if output == OutputFormat.json:
        emit_json({"job": record.to_dict(), "trials": rows, "result": result})
    elif result:
        typer.echo(f"best trial {result['best_trial']}: {json.dumps(result['best_params'])}  {result['metric']} {result['value']:.4f}")
        if result.get("version"):
            typer.echo(f"registered models:/{result['registered_model']}/{result['version']} (only the best trial's adapter)")
    if record.state != "succeeded":
        raise JobError(f"sweep {record.id} {record.state}: {record.reason or 'see `platformctl finetune logs ' + record.id + '`'}")
