"""Printing for the CLI: tables for people, `--output json` for scripts."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any, Iterable, Sequence

import typer


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


# Kubernetes flags shared by `finetune` and `serve` (`--target k8s`).
NAMESPACE_OPTION = typer.Option(None, "--namespace", "-n", envvar="PLATFORM_K8S_NAMESPACE",
                                help="k8s: namespace (default: the kubeconfig context's namespace; in a pod its service account's; else `default`).")
KUBECONFIG_OPTION = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG", help="k8s: kubeconfig file (default: in-cluster or ~/.kube/config).")
CONTEXT_OPTION = typer.Option(None, "--context", envvar="PLATFORM_K8S_CONTEXT", help="k8s: kubeconfig context.")
OPERATOR_TIMEOUT_OPTION = typer.Option(15.0, "--operator-timeout", envvar="PLATFORM_K8S_OPERATOR_TIMEOUT", min=0,
                                       help="k8s: seconds to wait for the operator to pick up a new or changed resource before "
                                            "reporting that none watches the namespace; 0: don't check.")
OUTPUT_OPTION = typer.Option(OutputFormat.table, "--output", "-o", help="table for people, json for scripts.")


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def render_table(rows: Sequence[dict], columns: Iterable[str]) -> str:
    """A plain, aligned text table (no colour codes, so it pipes and greps well)."""
    columns = list(columns)
    cells = [[str(r.get(c, "") if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    head = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([head.rstrip(), *[b.rstrip() for b in body]])


def emit(data: Any, output: OutputFormat, *, columns: Iterable[str] | None = None, text: str | None = None) -> None:
    """Print `data` as JSON, or as a table of `columns`, or as the given `text`."""
    if output == OutputFormat.json:
        emit_json(data)
    elif text is not None:
        typer.echo(text)
    elif columns is not None:
        rows = data if isinstance(data, list) else [data]
        typer.echo(render_table(rows, columns) if rows else "(none)")
    else:
        typer.echo(json.dumps(data, indent=2, default=str))
