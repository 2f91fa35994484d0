"""platformctl entry point: assembles the noun groups and maps platform errors to exit codes."""

from __future__ import annotations

import os
import sys

import typer
import typer.main

from llmplatform.cli import spec
from llmplatform.errors import PlatformError


def build_app() -> typer.Typer:
    """The full command tree. Nouns are imported lazily by their own modules' heavy code."""
    from llmplatform.cli import data, evaluation, finetune, models, plan, serve, stack, usage, version

    app = typer.Typer(
        help="platformctl: fine-tune and serve Llama 2 on Ray, tracked in MLflow.",
        no_args_is_help=True,
        add_completion=False,  # `platformctl completion SHELL` prints the script instead
        pretty_exceptions_enable=False,
    )
    app.callback(invoke_without_command=True)(version.root)
    stack.register(app)
    app.command("plan")(plan.plan)
    app.add_typer(spec.app, name="spec")
    app.add_typer(data.app, name="data")
    app.add_typer(finetune.app, name="finetune")
    app.add_typer(models.app, name="models")
    app.add_typer(evaluation.app, name="eval")
    app.add_typer(serve.app, name="serve")
    app.command("doctor")(version.doctor)
    app.command("completion")(version.completion)
    app.command("usage")(usage.usage)
    app.add_typer(usage.keys_app, name="keys")
    return app


def build_command() -> typer.core.TyperGroup:
    """The command tree platformctl runs: `build_app()` plus `-v/--verbose` on every command."""
    from llmplatform.cli.verbosity import add_verbose

    return add_verbose(typer.main.get_command(build_app()))


# MLflow's client retries a failed request 7 times with backoff factor 2 (~4 min); a CLI call
# should give up in seconds. Set before MLflow is imported; the user's own values win.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def main(argv: list[str] | None = None) -> int:
    """Run platformctl; returns the exit code (usage errors 2, PlatformError its own code)."""
    for key, value in MLFLOW_CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    command = build_command()
    try:
        command.main(args=argv, prog_name="platformctl")  # standalone: ends with SystemExit
    except PlatformError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
