"""`platformctl up/down/status`: the embedded local stack (Ray head + MLflow server)."""

from __future__ import annotations

import typer

from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit
from llmplatform.stack import lifecycle

COLUMNS = ["name", "state", "healthy", "pid", "url"]


def _show(info: lifecycle.StackInfo, output: OutputFormat) -> None:
    if output == OutputFormat.json:
        emit(info.to_dict(), output)
        return
    rows = [c.to_dict() for c in info.components]
    emit(rows, output, columns=COLUMNS)
    if info.ray_address:
        typer.echo(f"\nray address:   {info.ray_address}   (dashboard/Jobs API {info.dashboard_url})")
    if info.mlflow_url:
        typer.echo(f"tracking URI:  {info.mlflow_url}")
    if info.cpu_partition:
        typer.echo(f"CPUs:          front end {info.cpu_partition['front']}, model {info.cpu_partition['model']}   (--cpu-partition)")
    typer.echo(f"home:          {info.home}")


def up(
    ray_port: int = typer.Option(6379, "--ray-port", min=1, max=65535, help="Ray GCS port (ray.init address)."),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", min=1, max=65535, help="Ray dashboard / Jobs API port."),
    mlflow_port: int = typer.Option(5000, "--mlflow-port", min=1, max=65535, help="MLflow tracking server port."),
    num_cpus: int = typer.Option(8, "--num-cpus", min=1, help="Logical CPUs Ray advertises (over-subscribed on purpose: placement groups need more than 2)."),
    cpu_partition: str = typer.Option(
        "auto", "--cpu-partition",
        help="Hosts without a GPU: run Ray and the serving path on front-end CPUs and model compute on the rest. "
             "auto (the last CPU per 8; off with a GPU or under 2 CPUs), off, or the front-end CPUs (e.g. 1 or 6-7).",
    ),
    timeout: float = typer.Option(lifecycle.DEFAULT_TIMEOUT, "--timeout", help="Seconds to wait for both health checks."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Start the local stack on 127.0.0.1 under $PLATFORM_HOME (idempotent) and wait until healthy."""
    info = lifecycle.up(
        ray_port=ray_port, dashboard_port=dashboard_port, mlflow_port=mlflow_port, num_cpus=num_cpus,
        cpu_partition=cpu_partition, timeout=timeout, progress=lambda msg: typer.echo(msg, err=True),
    )  # fmt: skip
    if output == OutputFormat.table:
        states = {c.state for c in info.components}
        typer.echo("stack is up" if "running" not in states else "stack already running" if states == {"running"} else "stack is up (restarted what had stopped)")
    _show(info, output)


def down(output: OutputFormat = OUTPUT_OPTION) -> None:
    """Stop exactly what `up` started (by process group) and keep the MLflow data on disk."""
    before = lifecycle.down(progress=lambda msg: typer.echo(msg, err=True))
    stopped = [c.name for c in before.components if c.pid is not None]
    if output == OutputFormat.json:
        emit({"home": before.home, "stopped": stopped}, output)
    else:
        typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


def status(output: OutputFormat = OUTPUT_OPTION) -> None:
    """Each component's state, PID, URL and a live health check. Exit 1 unless all are healthy."""
    info = lifecycle.status()
    _show(info, output)
    if not info.healthy:
        typer.echo("stack is not (fully) running: run `platformctl up`", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("status")(status)
