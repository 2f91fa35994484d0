"""`platformctl models`: the model registry (MLflow aliases), promotion and rollback.

Each command parses its options, calls one function of `llmplatform.registry`, and prints the
result as a table or `--output json`. The tracking server is `--tracking-uri`, else
`$MLFLOW_TRACKING_URI`, else the running local stack (`platformctl up`).
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit, emit_json, render_table

app = typer.Typer(help="Registered adapters (MLflow model registry): list, show, promote, rollback, export.", no_args_is_help=True)

TRACKING_OPTION = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_envvar=True,
                               help="MLflow tracking server; default: the running local stack (platformctl up).")
DIRECTION_HELP = ("Direction: metrics whose name contains loss, perplexity, ppl, error or latency are better when "
                  "lower; all others are better when higher; ties pass.")


def resolve_tracking_uri(given: str | None) -> str:
    """--tracking-uri / $MLFLOW_TRACKING_URI, else the local stack's server, else a clear error;
    a server that does not answer is an error at once (MLflow's own client retries for minutes)."""
    from llmplatform.backends.tracking import tracking_uri_for
    from llmplatform.errors import RegistryError, StackError
    from llmplatform.reach import require_reachable

    try:
        uri = tracking_uri_for(given)
    except StackError as exc:
        raise RegistryError(f"{str(exc).rstrip('.')} (or pass --tracking-uri)") from exc
    require_reachable(uri, "the MLflow tracking server", "start it (`platformctl up` for the local one) or pass "
                      "--tracking-uri / set MLFLOW_TRACKING_URI to a running server", RegistryError)
    return uri


@app.command("list")
def list_cmd(name: Optional[str] = typer.Option(None, "--name", help="Only models whose name contains this."),
             tracking_uri: Optional[str] = TRACKING_OPTION, output: OutputFormat = OUTPUT_OPTION) -> None:
    """Registered models: versions, aliases, base model, key eval metrics of the latest version, created."""
    from llmplatform.registry import list_models

    rows = list_models(resolve_tracking_uri(tracking_uri), name_contains=name)
    if output == OutputFormat.json:
        emit_json(rows)
        return
    table = [{**r, "aliases": _aliases_text(r["aliases"]), "metrics": _metrics_text(r["metrics"]),
              "latest": f"v{r['latest']}" if r["latest"] else None} for r in rows]
    emit(table, output, columns=["name", "versions", "latest", "aliases", "base_model", "metrics", "created"])


@app.command("show")
def show_cmd(name: str = typer.Argument(..., help="Registered model name."),
             version: Optional[int] = typer.Option(None, "--version", "-v", help="Version to detail (default: latest)."),
             tracking_uri: Optional[str] = TRACKING_OPTION, output: OutputFormat = OUTPUT_OPTION) -> None:
    """One model: lineage (run, dataset, base, spec, git), metrics, adapter config, aliases, promotion history."""
    from llmplatform.registry import show_model

    data = show_model(resolve_tracking_uri(tracking_uri), name, version)
    if output == OutputFormat.json:
        emit_json(data)
    else:
        typer.echo(render_show(data))


@app.command("promote")
def promote_cmd(name: str = typer.Argument(..., help="Registered model name."),
                version: int = typer.Option(..., "--version", "-v", help="Version to promote."),
                to: str = typer.Option(..., "--to", help="Alias to move, e.g. staging or production."),
                require: List[str] = typer.Option([], "--require", help="Gate METRIC OP NUMBER on the version's logged "
                                                  "metrics or its eval tags, e.g. eval_loss<=1.2, "
                                                  "'eval.reverse.exact_match>=0.9' (ops <=,<,>=,>,==); repeatable."),
                no_worse_than: Optional[str] = typer.Option(None, "--no-worse-than", help="Gate: no worse than the current "
                                                            "holder of this alias on the --require metrics (else on every "
                                                            "eval* metric both logged). " + DIRECTION_HELP),
                canary: Optional[float] = typer.Option(None, "--canary", help="Start a canary instead: this percentage of "
                                                       "ALIAS's requests go to the version (sticky by the request's `user`)."),
                complete: bool = typer.Option(False, "--complete", help="Complete the running canary of this version: "
                                              "ALIAS moves to it."),
                abort_if: List[str] = typer.Option([], "--abort-if", help="Canary guard METRIC OP NUMBER[*baseline], e.g. "
                                                   "'error_rate>0.02', 'ttft_p95>2*baseline' (metrics: error_rate, "
                                                   "ttft_p50, ttft_p95); repeatable."),
                window: Optional[str] = typer.Option(None, "--window", help="Canary guard window, e.g. 5m (default 5m)."),
                promote_after: Optional[str] = typer.Option(None, "--promote-after", help="Complete the canary by itself "
                                                            "when the guard held this long, e.g. 30m."),
                evaluate: Optional[str] = typer.Option(None, "--evaluate", metavar="EVAL.yaml", help="First run this eval "
                                                       "spec on the version (and the --no-worse-than holder) where its "
                                                       "eval.<dataset>.<metric> tags are missing."),
                reason: Optional[str] = typer.Option(None, "--reason", help="Why; recorded in the history."),
                actor: Optional[str] = typer.Option(None, "--actor", help="Who; default $USER."),
                tracking_uri: Optional[str] = TRACKING_OPTION, output: OutputFormat = OUTPUT_OPTION) -> None:
    """Point ALIAS at a version if every gate passes; a refusal names the failed gate and changes nothing.
    With --canary, start a canary of the version on ALIAS instead; --complete finishes one."""
    from llmplatform.registry import canary as canaries
    from llmplatform.registry import canary_rules, promote

    uri = resolve_tracking_uri(tracking_uri)
    if canary is None and (abort_if or window or promote_after):
        raise canary_rules.CanaryError("--abort-if, --window and --promote-after guard a canary; add --canary PERCENT")
    if complete:
        record = canaries.complete(uri, name, to, version, actor=actor, reason=reason)
    elif canary is not None:
        guard = canary_rules.parse_guard(abort_if, window, promote_after)
        record = canaries.start(uri, name, version, to, canary, guard, actor=actor, reason=reason)
    else:
        if evaluate:
            _evaluate_missing(uri, evaluate, name, version, no_worse_than)
        record = promote(uri, name, version, to, require=require, no_worse_than=no_worse_than, actor=actor, reason=reason)
    _emit_record(record, output)


def _evaluate_missing(uri: str, spec_path: str, name: str, version: int, no_worse_than: str | None) -> None:
    """`promote --evaluate`: the eval spec on the candidate and the alias holder where tags are missing."""
    from llmplatform.evaluation.runner import evaluate_missing
    from llmplatform.registry import client as mc
    from llmplatform.specs import load_spec

    spec = load_spec(spec_path, "eval")
    holder = mc.alias_holder(mc.connect(uri), name, no_worse_than) if no_worse_than else None
    report = evaluate_missing(uri, spec, name, [version] + ([holder] if holder is not None else []))
    for row in report.rows() if report else []:
        typer.echo(f"evaluated {row['model']} on {report.dataset}: run {row['run_id']}", err=True)
    if report:
        from llmplatform.cli.evaluation import failure_lines
        from llmplatform.errors import EvalError

        for line in failure_lines(report.rows(), report.examples, report.dataset):
            typer.echo(line, err=True)
        if report.failed():
            raise EvalError("; ".join(report.failed()))


@app.command("canary")
def canary_cmd(name: str = typer.Argument(..., help="Registered model name."),
               alias: str = typer.Option(..., "--alias", "-a", help="Alias whose canary to change, e.g. production."),
               weight: float = typer.Option(..., "--weight", help="New canary percentage (above 0, below 100)."),
               reason: Optional[str] = typer.Option(None, "--reason", help="Why; recorded in the history."),
               actor: Optional[str] = typer.Option(None, "--actor", help="Who; default $USER."),
               tracking_uri: Optional[str] = TRACKING_OPTION, output: OutputFormat = OUTPUT_OPTION) -> None:
    """Change the share of ALIAS's requests the running canary gets."""
    from llmplatform.registry import canary as canaries

    _emit_record(canaries.set_weight(resolve_tracking_uri(tracking_uri), name, alias, weight, actor=actor, reason=reason), output)


@app.command("rollback")
def rollback_cmd(name: str = typer.Argument(..., help="Registered model name."),
                 alias: str = typer.Option(..., "--alias", "-a", help="Alias to move back, e.g. production."),
                 reason: Optional[str] = typer.Option(None, "--reason", help="Why; recorded in the history."),
                 actor: Optional[str] = typer.Option(None, "--actor", help="Who; default $USER."),
                 tracking_uri: Optional[str] = TRACKING_OPTION, output: OutputFormat = OUTPUT_OPTION) -> None:
    """Move ALIAS back to the version that held it before; repeat to walk further back. A running
    canary on ALIAS is aborted instead (all traffic back on the holder)."""
    from llmplatform.registry.canary import rollback

    record = rollback(resolve_tracking_uri(tracking_uri), name, alias, actor=actor, reason=reason)
    _emit_record(record, output)


@app.command("export")
def export_cmd(ref: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION (models:/ prefix optional)."),
               fmt: str = typer.Option(..., "--format", "-f", help="merged (base + adapter folded in, safetensors), "
                                       "gguf (the merged model for llama.cpp) or adapter (the peft folder)."),
               out: str = typer.Option(..., "--out", "-o", help="A new (or empty) folder to write the export into."),
               dtype: str = typer.Option("auto", "--dtype", help="merged: auto (the base's dtype), float32, bfloat16 or float16."),
               gguf_type: str = typer.Option("bf16", "--gguf-type", help="gguf: bf16, f16 or q8_0 (norms stay float32)."),
               base: Optional[str] = typer.Option(None, "--base", help="Base checkpoint folder (default: the version's lineage base_model)."),
               register: bool = typer.Option(True, "--register/--no-register", help="Log the export as an artifact of the version's "
                                             "run and tag the version export.<format>."),
               tracking_uri: Optional[str] = TRACKING_OPTION, output: OutputFormat = OUTPUT_OPTION) -> None:
    """Export a registered adapter: merged weights, GGUF or the adapter folder, with its lineage in export.json."""
    from llmplatform.registry.export import export

    full = ref if ref.startswith("models:/") else f"models:/{ref}"
    record = export(resolve_tracking_uri(tracking_uri), full, fmt, out, dtype=dtype, gguf_type=gguf_type, register=register, base_dir=base)
    if output == OutputFormat.json:
        emit_json(record)
        return
    typer.echo(f"exported {record['name']} v{record['version']} as {fmt} to {record['out']} (base {record['base_model']})")
    for name, sha in record["files"].items():
        typer.echo(f"  {name}  sha256:{sha[:16]}")
    if record["artifact"]:
        typer.echo(f"recorded on the version: tag export.{fmt}, artifact {record['artifact']}")


def _emit_record(record, output: OutputFormat) -> None:
    if output == OutputFormat.json:
        emit_json(record.to_dict())
        return
    frm = f"v{record.from_version}" if record.from_version is not None else "(unset)"
    if not record.changed:
        typer.echo(f"{record.name}@{record.alias} already points at v{record.to_version}; nothing changed")
        return
    if record.canary is not None:
        c = record.canary
        typer.echo(f"{record.name}@{record.alias}: {record.kind} v{c['version']} at {c['weight']:g}% (rest on v{c['baseline']}) "
                   f"by {record.actor} at {record.time}" + (f": {record.reason}" if record.kind == "canary-abort" else ""))
        return
    typer.echo(f"{record.name}@{record.alias}: {frm} -> v{record.to_version} ({record.kind} by {record.actor} at {record.time})")
    for gate in record.gates:
        typer.echo(f"  {gate['message']}")
    if record.superseded_by is not None:
        typer.echo(f"  note: a concurrent change moved {record.alias} to v{record.superseded_by} right after this one")


def render_show(data: dict) -> str:
    """`models show` for people: the version's lineage and adapter, then versions and history."""
    lines = [f"{data['name']}  (created {data['created']})", f"  aliases: {_aliases_text(data['aliases'])}"]
    if data.get("url"):
        lines.append(f"  ui: {data['url']}")
    v = data.get("version")
    if v:
        lin, ad = v["lineage"], v["adapter"]
        lines += ["", f"version {v['version']}  [{v['status']}]  aliases: {', '.join(v['aliases']) or '-'}  created {v['created']}",
                  f"  run:          {v['run_id']}  {v['run_url'] or ''}".rstrip(),
                  f"  base model:   {lin.get('base_model', '-')}  {lin.get('base_model_sha') or lin.get('base_model_uri') or ''}".rstrip(),
                  f"  dataset sha:  {lin.get('dataset_sha256', '-')}",
                  f"  job / git:    {lin.get('job_id', '-')} / {lin.get('git_sha', '-')}",
                  f"  adapter:      r={ad.get('r')} alpha={ad.get('lora_alpha')} targets={_list_text(ad.get('target_modules'))} "
                  f"modules_to_save={_list_text(ad.get('modules_to_save'))}",
                  f"  adapter sha:  {v.get('adapter_sha256')}",
                  f"  metrics:      {_metrics_text(v['metrics'], limit=None)}"]
        if lin.get("spec") is not None:
            spec = lin["spec"] if isinstance(lin["spec"], str) else json.dumps(lin["spec"], sort_keys=True)
            lines.append(f"  spec:         {spec[:300]}{'...' if len(spec) > 300 else ''}")
    lines += ["", "versions:", _indent(render_table([{**x, "aliases": ", ".join(x["aliases"])} for x in data["versions"]],
                                                   ["version", "aliases", "status", "created", "run_id"]))]
    history = [{"time": e["time"], "alias": e["alias"], "kind": e["kind"] + (f" (superseded by v{e['superseded_by']})" if e.get("superseded_by") else ""),
                "from": f"v{e['from_version']}" if e["from_version"] is not None else None, "to": f"v{e['to_version']}",
                "actor": e["actor"], "reason": e.get("reason")} for e in reversed(data["history"])]
    for alias, c in (data.get("canaries") or {}).items():
        guard = c["guard"]
        lines += ["", f"canary on {alias}: v{c['version']} at {c['weight']:g}%, v{c['baseline']} at {100 - c['weight']:g}%"
                  f"  guard: {' and '.join(guard['abort_if']) or 'none'} over {guard['window_s']:g} s"
                  + (f", promote after {guard['promote_after_s']:g} s" if guard.get("promote_after_s") else "")]
    lines += ["", "promotion history (newest first):",
              _indent(render_table(history, ["time", "alias", "kind", "from", "to", "actor", "reason"]) if history else "(none)")]
    return "\n".join(lines)


def _aliases_text(aliases: dict) -> str:
    return ", ".join(f"{a}=v{v}" for a, v in aliases.items()) or "-"


def _metrics_text(metrics: dict, limit: int | None = 4) -> str:
    items = list(metrics.items())[:limit] if limit else list(metrics.items())
    return ", ".join(f"{k}={v:.4g}" for k, v in items) or "-"


def _list_text(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
