"""`platformctl data`: validate datasets before any compute is allocated."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit_json
from llmplatform.errors import DataError

app = typer.Typer(help="Validate datasets and preview rendered examples.", no_args_is_help=True)

DEFAULT_TOKENIZER = "llama2-tiny"
DEFAULT_MAX_LEN = 2048


class RecordFormat(str, Enum):
    auto = "auto"
    chat = "chat"
    sharegpt = "sharegpt"
    prompt_completion = "prompt_completion"
    alpaca = "alpaca"
    text = "text"


class Truncation(str, Enum):
    right = "right"
    drop = "drop"


def _load_spec_if_spec(path: str):
    """A FineTuneSpec when `path` is a spec file (YAML, or JSON with `base_model`), else None."""
    from llmplatform import specs

    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        return specs.load_spec(p, "finetune")
    if p.suffix.lower() == ".json" and p.is_file():
        try:
            body = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(body, dict) and ("base_model" in body or body.get("kind") == "FineTuneJob"):
            return specs.load_spec(p, "finetune")
    return None


@app.command("validate")
def validate(
    target: str = typer.Argument(..., metavar="SPEC_OR_FILE", help="A FineTuneSpec YAML (checks its train and validation files), a JSONL/JSON/Parquet file or URI, or hf://datasets/OWNER/NAME?split=SPLIT&revision=REV."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer directory or model name; default: the spec's base model, else llama2-tiny."),
    max_seq_length: int = typer.Option(None, "--max-seq-length", min=16, help=f"Tokens per example; default: the spec's, else {DEFAULT_MAX_LEN}."),
    record_format: RecordFormat = typer.Option(None, "--format", help="Record shape; default: the spec's, else auto (per record)."),
    truncation: Truncation = typer.Option(None, "--truncation", help="right: cut the end; drop: skip long examples. Default: the spec's, else right."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Check every record; print token statistics and a preview with the trained span marked. Exit 1 on bad records."""
    from llmplatform.data import load_tokenizer, validate_dataset
    from llmplatform.data.validate import MARK_ANSI, MARK_PLAIN

    spec = _load_spec_if_spec(target)
    tok = load_tokenizer(tokenizer or (spec.base_model if spec else DEFAULT_TOKENIZER))
    fmt = record_format.value if record_format else None
    trunc = truncation.value if truncation else None
    try:
        if spec is not None and spec.objective == "dpo":  # preference records: their own checks and report
            from llmplatform.data.preference import validate_preference_dataset

            report = validate_preference_dataset(spec, tok)
        else:
            report = validate_dataset(spec if spec else target, tok, max_seq_length or (None if spec else DEFAULT_MAX_LEN), fmt, trunc)
    except DataError as exc:
        problems = [{"location": p.location, "reason": p.message, "given": p.given, "accepted": p.accepted, "text": p.render()} for p in exc.problems]
        if output == OutputFormat.json:
            emit_json({"valid": False, "source": exc.source, "problems": problems})
        else:
            typer.echo(f"{exc.source}: {len(problems)} bad record(s)", err=True)
            for p in problems:
                typer.echo(f"  {p['text']}", err=True)
        raise typer.Exit(1)
    if output == OutputFormat.json:
        emit_json({"valid": True, **report.to_dict()})
        return
    text = report.render()
    if sys.stdout.isatty():
        text = text.replace(MARK_PLAIN[0], MARK_ANSI[0]).replace(MARK_PLAIN[1], MARK_ANSI[1])
    typer.echo(text)
    typer.echo("valid: every record passed")
