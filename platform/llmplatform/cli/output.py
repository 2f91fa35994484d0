"""Printing for the CLI: tables for people, `--output json` for scripts, live progress on a terminal.

On a terminal, tables and progress (fine-tune steps, deploy replica states) are drawn with rich;
when stdout/stderr is not a terminal, or with `--output json`, the same information is plain text
(one line per change), so logs, pipes and scripts see stable output. JSON shapes never change.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any, Callable, Iterable, Sequence

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
        if rows and sys.stdout.isatty():
            print_rich_table(rows, columns)
        else:
            typer.echo(render_table(rows, columns) if rows else "(none)")
    else:
        typer.echo(json.dumps(data, indent=2, default=str))


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def print_rich_table(rows: Sequence[dict], columns: Iterable[str]) -> None:
    """The table of `render_table`, drawn by rich for a terminal (column widths fit the window)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = list(columns)
    for col in columns:
        table.add_column(col.upper(), overflow="fold")
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    Console().print(table)


def replica_summary(snapshot: dict) -> str:
    """`DEPLOYING  LLMServer UPDATING (STARTING 1)  Ingress HEALTHY (RUNNING 1)` from a deploy snapshot."""
    parts = [snapshot.get("state") or "PENDING"]
    for name, dep in sorted(snapshot.get("deployments", {}).items()):
        replicas = ", ".join(f"{state} {n}" for state, n in sorted(dep.get("replicas", {}).items()) if n)
        parts.append(f"{name} {dep.get('status', '?')}" + (f" ({replicas})" if replicas else ""))
    return "  ".join(parts)


class LiveLines:
    """Progress on stderr: a rich spinner line (terminal) or one plain line per change (otherwise).

    `update(text)` shows the latest text; `close()` leaves the last text on screen. `enabled=False`
    (e.g. `--output json`) prints nothing, so stdout and stderr stay quiet for scripts.
    """

    def __init__(self, title: str, *, enabled: bool = True, terminal: bool | None = None) -> None:
        self.title, self.enabled, self.last = title, enabled, ""
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._status = None
        if enabled and self.terminal:
            from rich.console import Console

            self._console = Console(stderr=True)
            self._status = self._console.status(title)
            self._status.start()

    def update(self, text: str) -> None:
        if not self.enabled or text == self.last:
            return
        self.last = text
        if self._status is not None:
            self._status.update(f"{self.title}: {text}")
        else:
            typer.echo(f"{self.title}: {text}", err=True)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            if self.last:
                self._console.print(f"{self.title}: {self.last}")

    def __enter__(self) -> "LiveLines":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def deploy_progress(title: str, output: OutputFormat) -> tuple[LiveLines, Callable[[dict], None]]:
    """A LiveLines for a deploy and the callback that feeds it deploy snapshots (elapsed time too)."""
    lines = LiveLines(title, enabled=output != OutputFormat.json)
    return lines, lambda snap: lines.update(f"{replica_summary(snap)}  ({snap.get('elapsed_s', 0):.0f}s)")


class StepBar:
    """Fine-tune progress on stdout: a rich bar (terminal) or `fallback(record)` lines per change."""

    def __init__(self, title: str, *, terminal: bool | None = None) -> None:
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.last = ""
        self._progress = None
        if self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[detail]}"))
            self._task = self._progress.add_task(title, total=None, detail="")
            self._progress.start()

    def update(self, step: int, total: int | None, detail: str, plain_line: str) -> None:
        """Move the bar to `step` of `total`; `plain_line` is what a non-terminal gets on a change."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step, total=total or None, detail=detail)
        elif plain_line != self.last:
            typer.echo(plain_line)
        self.last = plain_line

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class LiveTable:
    """A table that changes (a sweep's trials): redrawn by rich on a terminal; otherwise one plain
    `render_table` row per changed row on stderr. `enabled=False` (`--output json`) prints nothing."""

    def __init__(self, title: str, columns: Sequence[str], *, enabled: bool = True, terminal: bool | None = None) -> None:
        self.title, self.columns, self.enabled = title, list(columns), enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.seen: dict[str, str] = {}
        self._live = None
        if enabled and self.terminal:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._table([]), console=Console(stderr=True), refresh_per_second=4)
            self._live.start()

    def _table(self, rows: Sequence[dict]):
        from rich.table import Table

        table = Table(title=self.title, box=None, header_style="bold", pad_edge=False)
        for col in self.columns:
            table.add_column(col.upper())
        for row in rows:
            table.add_row(*[_cell(row.get(c)) for c in self.columns])
        return table

    def update(self, rows: Sequence[dict]) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.update(self._table(rows))
            return
        for row in rows:
            line = "  ".join(f"{c}={_cell(row.get(c))}" for c in self.columns)
            key = str(row.get(self.columns[0]))
            if self.seen.get(key) != line:
                self.seen[key] = line
                typer.echo(f"{self.title}: {line}", err=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
