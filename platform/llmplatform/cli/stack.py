"""`platformctl up/down/status`: the embedded local stack (Ray head + MLflow server)."""

import typer

from llmplatform.errors import NotImplementedYet


def register(app: typer.Typer) -> None:
    for verb in ("up", "down", "status"):
        def _cmd(_verb: str = verb) -> None:
            raise NotImplementedYet(f"`platformctl {_verb}` is being built (issue 2).")
        app.command(verb)(_cmd)
