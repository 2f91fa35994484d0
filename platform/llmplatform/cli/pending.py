"""Nouns whose commands later issues fill in: they say so plainly and exit 2."""

from __future__ import annotations

import typer

from llmplatform.errors import NotImplementedYet


def pending_noun(name: str, help_text: str, verbs: list[str], issue: str) -> typer.Typer:
    """A command group whose verbs exist in `--help` but refuse to run (exit 2, no output)."""
    app = typer.Typer(help=f"{help_text} [not implemented yet: {issue}]", no_args_is_help=True)
    for verb in verbs:
        def _cmd(ctx: typer.Context, _verb: str = verb) -> None:
            raise NotImplementedYet(f"`platformctl {name} {_verb}` is not implemented yet ({issue}).")
        app.command(verb, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, help=f"[not implemented yet: {issue}]")(_cmd)
    return app
