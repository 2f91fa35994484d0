"""`platformctl spec`: validate spec files, print their resolved plans and their JSON schemas."""

from __future__ import annotations

from pathlib import Path

import typer

from llmplatform import specs
from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit, emit_json
from llmplatform.cli.resolve import resolve_command

app = typer.Typer(help="Validate fine-tune and serve specs, print their resolved plans and JSON schemas.", no_args_is_help=True)


@app.command("validate")
def validate(
    files: list[Path] = typer.Argument(..., help="Spec files (YAML or JSON)."),
    kind: str = typer.Option(None, "--kind", help="finetune, serve or eval; default: read from the file or guessed."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Check spec files; report every problem with its field path, what was given and what is accepted."""
    results, failed = [], False
    for path in files:
        try:
            spec = specs.load_spec(path, kind)
            results.append({"file": str(path), "kind": specs.spec_kind(spec), "name": spec.name, "valid": True, "problems": []})
        except specs.SpecError as exc:
            failed = True
            results.append({"file": str(path), "valid": False, "problems": [p.__dict__ | {"text": p.render()} for p in exc.problems]})
            if output == OutputFormat.table:
                typer.echo(str(exc), err=True)
    if output == OutputFormat.json:
        emit_json(results)
    else:
        for r in results:
            if r["valid"]:
                typer.echo(f"{r['file']}: valid {r['kind']} spec '{r['name']}'")
    if failed:
        raise typer.Exit(1)


app.command("resolve")(resolve_command)


@app.command("schema")
def schema(kind: str = typer.Argument(..., help="finetune, serve or eval")) -> None:
    """Print the JSON schema of a spec kind."""
    emit(specs.json_schema(kind), OutputFormat.json)
