"""`platformctl --version [-o json]` and `platformctl completion bash|zsh|fish`."""

from __future__ import annotations

from enum import Enum

import typer

from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit

PROG = "platformctl"
COMPLETE_VAR = "_PLATFORMCTL_COMPLETE"  # the env var the shell scripts set when asking for completions


def root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print platformctl's version, git commit and the Ray/MLflow/torch/vLLM versions found, then exit."),
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o", help="With --version: table for people, json for scripts."),
) -> None:
    """platformctl: fine-tune and serve Llama 2 on Ray, tracked in MLflow."""
    if version:
        from llmplatform import about

        info = about.version_info()
        emit(info, output, text=about.render_version(info))
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion(shell: Shell = typer.Argument(..., help="bash, zsh or fish.")) -> None:
    """Print the shell completion script. Install: bash `eval "$(platformctl completion bash)"` in ~/.bashrc;
    zsh `eval "$(platformctl completion zsh)"` in ~/.zshrc; fish `platformctl completion fish > ~/.config/fish/completions/platformctl.fish`."""
    from typer._completion_shared import get_completion_script  # typer is pinned (pyproject); its scripts call back into platformctl

    typer.echo(get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell.value))


def doctor(
    port: list[int] = typer.Option(None, "--port", "-p", min=1, max=65535,
                                   help="Check this port instead of the stack's defaults (6379, 8265, 5000); repeatable."),
    cluster: bool = typer.Option(True, "--cluster/--no-cluster", help="Also ask the cluster (kubeconfig's) for the CRDs and the operator."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Check this machine: Python, torch, Ray, MLflow, vLLM, GPU/CUDA, disk for the model cache, free ports,
    kubeconfig and the operator; each problem with its fix. Exit 1 when any check is an error (warnings are fine)."""
    from llmplatform import doctor as checks

    found = checks.run_checks(checks.ports_to_check(port or []), cluster=cluster)
    rows = [c.to_dict() for c in found]
    if output == OutputFormat.json:
        emit({"ok": checks.exit_code(found) == 0, "checks": rows}, output)
    else:
        from llmplatform.cli.output import render_table

        typer.echo(render_table(rows, ["status", "name", "detail", "fix"]))
        errors = sum(c.status == checks.ERROR for c in found)
        warnings = sum(c.status == checks.WARNING for c in found)
        typer.echo(f"\n{errors} error(s), {warnings} warning(s)")
    raise typer.Exit(checks.exit_code(found))
