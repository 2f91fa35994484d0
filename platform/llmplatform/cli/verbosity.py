"""`-v/--verbose` on every platformctl command: the logging level of the run.

No flag leaves logging as Python's default (warnings and errors on stderr); `-v` shows the
platform's INFO messages, `-vv` its DEBUG messages and other libraries' INFO, `-vvv` everything.
The option is added to each command of the built command tree (typer's vendored click), so it works after any verb
(`platformctl serve deploy spec.yaml -v`) and before the noun (`platformctl -v serve ...`); where a
command already uses `-v` (e.g. `models show --version/-v`) only `--verbose` is added.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_MARK = "_platformctl_handler"


def levels(verbosity: int) -> tuple[int, int]:
    """(llmplatform logger level, root logger level) for a count of -v flags."""
    own = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = {0: logging.WARNING, 1: logging.WARNING, 2: logging.INFO}.get(verbosity, logging.DEBUG)
    return own, root


def configure_logging(verbosity: int) -> None:
    """Send log records to stderr at the levels for `verbosity` (replacing an earlier call's handler)."""
    own, root_level = levels(verbosity)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(root_level)
    logging.getLogger("llmplatform").setLevel(own)
    logging.getLogger("llmoperator").setLevel(own)


def _on_verbose(ctx: Any, _param: Any, value: int) -> None:
    if not value or ctx.resilient_parsing:
        return
    meta = ctx.find_root().meta
    meta["platformctl.verbosity"] = meta.get("platformctl.verbosity", 0) + value  # -v before and after the noun add up
    configure_logging(meta["platformctl.verbosity"])


def verbose_option(taken: set[str]) -> Any:
    """The option object (typer's own class, built by typer) without the flags in `taken`."""
    import typer
    import typer.main

    decls = [d for d in ("--verbose", "-v") if d not in taken]

    def carrier(verbose: int = typer.Option(0, *decls, count=True, expose_value=False, is_eager=True, callback=_on_verbose,
                                            help="Log more to stderr: -v INFO, -vv DEBUG (repeatable).")) -> None:
        """Only here so typer builds the option."""

    app = typer.Typer()
    app.command()(carrier)
    return typer.main.get_command(app).params[0]


def add_verbose(command: Any) -> Any:
    """Add the verbose option to `command` and every command below it; returns `command`."""
    taken = {opt for p in command.params for opt in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
    if "--verbose" not in taken:
        command.params.append(verbose_option(taken))
    for sub in getattr(command, "commands", {}).values():
        add_verbose(sub)
    return command
