"""`platformctl finetune sweep`: a hyperparameter sweep of a fine-tuning spec on Ray Tune.

Every `--param PATH=V1,V2` is checked against the spec, every trial's spec (the base with the
trial's values) is validated and resolved, and the data is validated, all before any compute.
The sweep is then one Ray job (`llmplatform.training.sweep`) recorded like a fine-tune job, so
`platformctl finetune status/logs/cancel ID` work on it; this command follows it with a live
table of trials (rich on a terminal, a line per change otherwise, JSON at the end with
`--output json`). Ctrl-C cancels the sweep and every trial.

The flags build the spec's `sweep:` section (`sweep_params.section_from_flags`); a spec that
has one runs without `--param`. With `--target k8s` the spec, section included, becomes a
FineTuneJob: the operator resolves every trial and runs the sweep as one KubeRay RayJob, and this
command reports and follows it like `finetune submit --target k8s`.
"""

from __future__ import annotations

import json
import time

import typer

from llmplatform.backends import records
from llmplatform.backends.base import JobRecord
from llmplatform.cli.output import (CONTEXT_OPTION, KUBECONFIG_OPTION, NAMESPACE_OPTION, OPERATOR_TIMEOUT_OPTION, OUTPUT_OPTION, LiveTable,
                                    OutputFormat, emit_json)
from llmplatform.errors import JobError

TRIAL_COLUMNS = ["trial", "state", "step", "loss", "eval_loss"]


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
    param: list[str] = typer.Option([], "--param", "-p", help="PATH=V1,V2,...: a spec field and the values to try, e.g. "
                                                              "hyperparameters.learning_rate=1e-4,3e-4 (repeat for more fields); "
                                                              "leave out to run the spec's own `sweep:` section."),
    search: str = typer.Option("grid", "--search", help="grid (every combination) or random (--trials draws)."),
    trials: int = typer.Option(None, "--trials", help="random search: how many trials.", min=1),
    metric: str = typer.Option("eval_loss", "--metric", help="What picks the best trial: eval_loss, eval_perplexity, eval_token_accuracy or loss."),
    mode: str = typer.Option("min", "--mode", help="min or max of --metric."),
    max_concurrent: int = typer.Option(2, "--max-concurrent", help="Trials running at once.", min=1),
    early_stop: str = typer.Option("none", "--early-stop", help="asha: stop trials that rank badly at eval steps (eval.every_n_steps, then x2, x4 ...)."),
    target: str = typer.Option("local", "--target", "-t", help="local (the `platformctl up` stack), ray (RAY_ADDRESS Jobs API) or k8s "
                                                                "(a FineTuneJob with a `sweep:` section; the operator runs it as one RayJob)."),
    detach: bool = typer.Option(False, "--detach", help="Print the sweep's job id and return; follow it with `platformctl finetune status ID` "
                                                        "(k8s: the FineTuneJob's name)."),
    output: OutputFormat = OUTPUT_OPTION,
    namespace: str = NAMESPACE_OPTION,
    kubeconfig: str = KUBECONFIG_OPTION,
    context: str = CONTEXT_OPTION,
    operator_timeout: float = OPERATOR_TIMEOUT_OPTION,
) -> None:
    """Run trials of SPEC over --param values on Ray Tune; register only the best trial's adapter."""
    from llmplatform.backends.facts import finetune_facts
    from llmplatform.backends.targets import backend_for
    from llmplatform.cli.finetune import validate_before_submit
    from llmplatform.resolve import resolve
    from llmplatform.specs import load_spec, resolve_local_paths
    from llmplatform.training.sweep_params import plan_from_section, section_from_flags, sweep_document
    from llmplatform.training.trainer import new_job_id

    if target not in ("local", "ray", "k8s"):
        raise JobError(f"--target {target!r} is unknown; use local, ray or k8s")
    loaded = load_spec(spec_path, "finetune")
    base = loaded if target == "k8s" else resolve_local_paths(loaded)  # k8s: paths are the cluster's, as for `finetune submit`
    if param and base.sweep is not None:
        raise JobError(f"{spec_path} has a `sweep:` section and --param was given: use one of them (drop --param to run the section)")
    if param:
        base = base.model_copy(update={"sweep": section_from_flags(param, base, search=search, trials=trials, metric=metric, mode=mode,
                                                                   max_concurrent=max_concurrent, early_stop=early_stop)})
    elif base.sweep is None:
        raise JobError("a sweep needs at least one --param PATH=V1,V2,... (e.g. --param hyperparameters.learning_rate=1e-4,3e-4), "
                       "or a `sweep:` section in the spec")
    sweep_plan, specs = plan_from_section(base.sweep, base, cli=bool(param))
    base_plan = resolve(base, finetune_facts(base, target)).require()
    plans = [resolve(s, finetune_facts(s, target)).require().to_dict() for s in specs]  # every trial resolved before any compute
    doc = sweep_document(sweep_plan, plans, cli=bool(param))
    validate_before_submit(base, target)
    if target == "k8s":  # the operator resolves again, with the cluster's facts
        from llmplatform.cli.finetune import _kube, _submit_k8s

        _submit_k8s(base, output, _kube(namespace, kubeconfig, context), wait=not detach, follow=not detach, operator_timeout_s=operator_timeout)
        return
    record = JobRecord(id=new_job_id(base.model_copy(update={"name": f"{base.name[:33]}-sweep"})), name=base.name, target=target,
                       spec=base.model_dump(mode="json"), registered_model=base.mlflow.registered_model_name)
    record = records.save(backend_for(target).submit(base_plan, record, module="llmplatform.training.sweep", extra=["--sweep-json", doc]))
    names = [p.path for p in sweep_plan.params]
    max_concurrent = sweep_plan.max_concurrent
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
