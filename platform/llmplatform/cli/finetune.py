"""`platformctl finetune`: submit, follow, list, inspect and cancel fine-tuning jobs.

`submit` validates the spec and the data first (bad records are refused with line numbers
before any worker starts), records the job, hands it to a backend (`local` stack, any `ray`
cluster, or `k8s`), prints the job id and MLflow run URL, and with `--wait`/`--follow` stays
until the job ends (non-zero exit unless it succeeded). On k8s it follows the FineTuneJob's
status (a line per change) and says so when no operator picks the job up.
"""

from __future__ import annotations

import sys
import time

import typer

from llmplatform.backends import records
from llmplatform.backends.base import TARGETS, JobRecord
from llmplatform.cli.output import (CONTEXT_OPTION, KUBECONFIG_OPTION, NAMESPACE_OPTION, OPERATOR_TIMEOUT_OPTION, OUTPUT_OPTION, OutputFormat, StepBar,
                                    emit, emit_json)
from llmplatform.errors import JobError, PlatformError

app = typer.Typer(help="Submit and manage LoRA/QLoRA fine-tuning jobs.", no_args_is_help=True)

LIST_COLUMNS = ["id", "name", "state", "progress", "last_loss", "started", "duration"]
K8S_COLUMNS = ["name", "namespace", "phase", "progress", "reason", "mlflow_run_id", "created"]

TARGET_OPTION = typer.Option("local", "--target", "-t", help="local (the `platformctl up` stack), ray (RAY_ADDRESS Jobs API) or k8s (FineTuneJob resources).")


def _kube(namespace: str | None, kubeconfig: str | None, context: str | None) -> dict:
    return {"namespace": namespace, "kubeconfig": kubeconfig, "context": context}


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(record: JobRecord, width: int = 24) -> str:
    """`[#####.....] 12/40 loss 1.234 tok/s 5400 ETA 1m10s` for the job's latest step."""
    total, step = record.total or 0, record.step
    filled = int(width * step / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {step}/{total or '?'}  {progress_detail(record)}"


def progress_detail(record: JobRecord) -> str:
    """`running  loss 1.2340  tok/s 5400  ETA 1m10s`: the job's state and latest step metrics."""
    total, step = record.total or 0, record.step
    m = record.metrics
    parts = [record.state]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    if "tokens_per_s" in m:
        parts.append(f"tok/s {m['tokens_per_s']:.0f}")
    elapsed = m.get("elapsed_s")
    steps_done = step - (m.get("start_step") or 0)
    if elapsed and steps_done > 0 and total and not record.terminal:  # an ended job has no ETA
        parts.append(f"ETA {_fmt_duration(elapsed / steps_done * (total - step))}")
    if record.restarts:
        parts.append(f"restarts {record.restarts}")
    return "  ".join(parts)


def result_text(record: JobRecord) -> str:
    lines = [f"job {record.id}: {record.state}" + (f" ({record.reason})" if record.reason and record.state != "succeeded" else "")]
    if record.step:
        lines.append(f"  steps                {record.step}/{record.total}")
    for key, value in {**record.metrics, **record.eval_metrics}.items():
        if key in ("loss", "eval_loss", "eval_perplexity", "eval_token_accuracy", "tokens_per_s"):
            lines.append(f"  {key:<20} {value:.4f}")
    m = record.metrics
    if "gpu_hours" in m:  # what the job consumed (training/resource_usage.py)
        lines.append(f"  gpu_hours            {m['gpu_hours']:.4f}")
        lines.append(f"  cpu_core_hours       {m['cpu_core_hours']:.4f}")
        lines.append(f"  trained_tokens       {m['trained_tokens']:.0f}")
    if record.checkpoint_step is not None:
        lines.append(f"  checkpoint           step {record.checkpoint_step}")
    if record.restarts:
        lines.append(f"  restarts             {record.restarts} (resumed from checkpoints)")
    if record.run_url:
        lines.append(f"  mlflow run           {record.run_url}")
    if record.version:
        lines.append(f"  registered           models:/{record.registered_model}/{record.version}")
    return "\n".join(lines)


def refresh(record: JobRecord) -> JobRecord:
    """Update a record from its backend and save it (terminal records are final)."""
    if record.terminal or record.target == "k8s" or not record.address:
        return record
    from llmplatform.backends.targets import backend_of

    return records.save(backend_of(record).refresh(record))


def validate_before_submit(spec, target: str = "local") -> dict:
    """The same data validation `platformctl data validate` runs; raises DataError on bad records.

    For `ray`/`k8s` targets the base model may only exist on the cluster: if its tokenizer is
    not available here, every record is still checked, but token statistics are skipped.
    """
    from llmplatform import data
    from llmplatform.data import preference
    from llmplatform.data.sources import is_uri

    try:
        tokenizer = data.load_tokenizer(spec.base_model)
    except (PlatformError, OSError, ValueError):
        if target == "local":
            raise
        for path in filter(None, (spec.data.train, spec.data.validation)):
            if not is_uri(path):
                preference.load_preference_records(path) if spec.objective == "dpo" else data.load_records(path, spec.data.format)
        return {}
    if spec.objective == "dpo":
        return preference.validate_preference_dataset(spec, tokenizer).to_dict()
    return data.validate_dataset(spec, tokenizer, spec.data.max_seq_length).to_dict()


def wait_for(record: JobRecord, follow: bool, poll_s: float = 1.0) -> JobRecord:
    """Poll until the job ends; with `follow`, show progress on the way (a rich bar on a terminal,
    a `progress_line` per change otherwise)."""
    bar = StepBar(f"job {record.id}") if follow else None
    try:
        while True:
            record = refresh(record)
            if bar is not None:
                bar.update(record.step, record.total, progress_detail(record), progress_line(record))
            if record.terminal:
                return record
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()


@app.command("submit")
def submit(
    spec_path: str = typer.Argument(..., metavar="SPEC.yaml", help="Fine-tuning spec (YAML or JSON)."),
    target: str = TARGET_OPTION,
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; exit non-zero unless it succeeded (k8s: Failed or Cancelled, with the message)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Like --wait, with a live progress bar (step/total, loss, tokens/s, ETA); k8s: a line per "
                                                               "change of the FineTuneJob's phase, progress, MLflow run. Ctrl-C stops following only."),
    output: OutputFormat = OUTPUT_OPTION,
    namespace: str = NAMESPACE_OPTION,
    kubeconfig: str = KUBECONFIG_OPTION,
    context: str = CONTEXT_OPTION,
    operator_timeout: float = OPERATOR_TIMEOUT_OPTION,
) -> None:
    """Validate SPEC and its data, then start the job. Prints the job id and the MLflow run URL
    (k8s: the FineTuneJob's namespace/name once the operator has picked it up)."""
    from llmplatform.backends.facts import finetune_facts
    from llmplatform.resolve import resolve
    from llmplatform.specs import load_spec, resolve_local_paths
    from llmplatform.training.trainer import new_job_id

    if target not in TARGETS:
        raise JobError(f"--target {target!r} is unknown; use one of {', '.join(TARGETS)}")
    spec = load_spec(spec_path, "finetune")
    if spec.sweep is not None and target != "k8s":  # on k8s the operator runs the section as a sweep
        raise JobError(f"{spec_path} has a `sweep:` section: run it with `platformctl finetune sweep {spec_path} --target {target}`")
    if target == "k8s":
        resolve(spec, finetune_facts(spec, target)).require()  # the operator resolves again with its own facts
        validate_before_submit(spec, target)
        _submit_k8s(spec, output, _kube(namespace, kubeconfig, context), wait=wait or follow, follow=follow, operator_timeout_s=operator_timeout)
        return
    spec = resolve_local_paths(spec)  # Ray workers don't share this shell's working directory
    plan = resolve(spec, finetune_facts(spec, target)).require()  # refused before any record or run exists
    validate_before_submit(spec, target)  # a refused spec or dataset leaves no job behind
    from llmplatform.backends.targets import backend_for

    record = JobRecord(id=new_job_id(spec), name=spec.name, target=target, spec=spec.model_dump(mode="json"), registered_model=spec.mlflow.registered_model_name)
    record = records.save(backend_for(target).submit(plan, record))  # recorded once a backend took it
    if output == OutputFormat.json and not (wait or follow):
        emit_json(record.to_dict())
        return
    if output != OutputFormat.json:
        typer.echo(f"job {record.id} submitted to {target} ({record.address})")
        typer.echo(f"mlflow run: {record.run_url}")
    if wait or follow:
        record = wait_for(record, follow and output != OutputFormat.json)
        if output == OutputFormat.json:
            emit_json(record.to_dict())
        else:
            typer.echo(result_text(record))
        if record.state != "succeeded":
            raise JobError(f"job {record.id} {record.state}: {record.reason or 'see `platformctl finetune logs ' + record.id + '`'}")


K8S_POLL_S = 2.0  # FineTuneJob status changes at most every few seconds (the operator's checks)


def _submit_k8s(spec, output: OutputFormat, kube: dict, *, wait: bool, follow: bool, operator_timeout_s: float) -> None:
    from llmplatform.backends import k8s

    if not wait:
        row = k8s.submit_finetune(spec, **kube, operator_timeout_s=operator_timeout_s)
        emit(row, output, text=f"FineTuneJob {row['namespace']}/{row['name']} created ({row['phase']}); "
                               f"follow it with `platformctl finetune status {row['name']} --target k8s -n {row['namespace']}`")
        return
    api = k8s.cli_connect(kube["kubeconfig"], kube["context"])
    row = k8s.submit_finetune(spec, **kube, api=api)  # the follower below reports a missing operator
    ns, name = row["namespace"], row["name"]
    if output != OutputFormat.json:
        typer.echo(f"FineTuneJob {ns}/{name} created; following its status (Ctrl-C stops following, the job keeps running; "
                   f"its log: `platformctl finetune logs {name} --target k8s -n {ns} -f`)")
    try:
        for row in k8s.watch_finetune(name, ns, api, operator_timeout_s=operator_timeout_s, poll_s=K8S_POLL_S):
            if follow and output != OutputFormat.json:
                typer.echo(k8s.change_line(row))
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; FineTuneJob {ns}/{name} keeps running. Check it with `platformctl finetune status {name} "
                   f"--target k8s -n {ns}`, cancel it with `platformctl finetune cancel {name} --target k8s -n {ns}`", err=True)
        raise typer.Exit(130) from None
    if output == OutputFormat.json:
        emit_json(row)
    elif not follow:  # --follow printed the final state already
        typer.echo(f"FineTuneJob {ns}/{name}: {k8s.change_line(row)}")
    if row["phase"] != "Succeeded":
        raise JobError(f"FineTuneJob {ns}/{name} {row['phase']}: {row.get('message') or row.get('reason') or 'no message'}")


@app.command("list")
def list_jobs(output: OutputFormat = OUTPUT_OPTION, target: str = TARGET_OPTION, namespace: str = NAMESPACE_OPTION,
              kubeconfig: str = KUBECONFIG_OPTION, context: str = CONTEXT_OPTION) -> None:
    """Jobs: id, name, state, progress, last loss, started, duration (k8s: the FineTuneJobs of a namespace)."""
    if target == "k8s":
        from llmplatform.backends import k8s

        emit(k8s.list_finetunes(**_kube(namespace, kubeconfig, context)), output, columns=K8S_COLUMNS)
        return
    rows = []
    for record in records.list_records():
        try:
            record = refresh(record)
        except PlatformError:
            pass  # an unreachable cluster shows the last known state
        row = record.summary()
        if output != OutputFormat.json:
            row["duration"] = _fmt_duration(row["duration_s"])
        rows.append(row)
    emit(rows, output, columns=LIST_COLUMNS)


@app.command("status")
def status(job_id: str = typer.Argument(..., metavar="ID"), output: OutputFormat = OUTPUT_OPTION, target: str = TARGET_OPTION,
           namespace: str = NAMESPACE_OPTION, kubeconfig: str = KUBECONFIG_OPTION, context: str = CONTEXT_OPTION) -> None:
    """State (and failure reason), current step, latest metrics, checkpoint, run URL."""
    if target == "k8s":
        from llmplatform.backends import k8s

        row = k8s.get_finetune(job_id, **_kube(namespace, kubeconfig, context))
        emit(row, output, text="\n".join(f"{k:<14} {v}" for k, v in row.items() if v is not None))
        return
    record = refresh(records.load(job_id))
    emit(record.to_dict(), output, text=result_text(record) + "\n  " + progress_line(record))


@app.command("logs")
def logs(job_id: str = typer.Argument(..., metavar="ID"), follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
         target: str = TARGET_OPTION, namespace: str = NAMESPACE_OPTION, kubeconfig: str = KUBECONFIG_OPTION, context: str = CONTEXT_OPTION) -> None:
    """The job's log (driver and workers)."""
    if target == "k8s":
        from llmplatform.backends import k8s

        chunks = k8s.finetune_logs(job_id, follow=follow, **_kube(namespace, kubeconfig, context))
    else:
        from llmplatform.backends.targets import backend_of

        record = records.load(job_id)
        chunks = backend_of(record).logs(record, follow=follow)
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()


@app.command("cancel")
def cancel(job_id: str = typer.Argument(..., metavar="ID"), output: OutputFormat = OUTPUT_OPTION, target: str = TARGET_OPTION,
           namespace: str = NAMESPACE_OPTION, kubeconfig: str = KUBECONFIG_OPTION, context: str = CONTEXT_OPTION) -> None:
    """Stop the workers, mark the MLflow run KILLED; nothing is registered."""
    if target == "k8s":
        from llmplatform.backends import k8s

        row = k8s.cancel_finetune(job_id, **_kube(namespace, kubeconfig, context))
        emit(row, output, text=f"FineTuneJob {row['namespace']}/{row['name']}: cancel requested (phase {row['phase']})")
        return
    from llmplatform.backends.targets import backend_of

    record = records.load(job_id)
    record = records.save(backend_of(record).cancel(record))
    emit(record.to_dict(), output, text=f"job {record.id}: {record.state} ({record.reason})")




def _register_sweep() -> None:
    from llmplatform.cli.sweep import sweep

    app.command("sweep")(sweep)


_register_sweep()
