"""`platformctl usage` (requests, tokens and errors per key, model, adapter or deployment, from
the usage store) and `platformctl keys add` (a new API key with a name and optional limits).

The usage store is `$PLATFORM_USAGE_DB` (a SQLAlchemy URL; on Kubernetes the platform's
Postgres) or SQLite at `$PLATFORM_HOME/usage.db`, written by the ingress replicas
(`llmplatform.serving.usage`). Keys are stored hashed (`llmplatform.serving.keys`): the plain key
is printed once, and only its SHA-256 goes into the keys file.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import typer

from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit
from llmplatform.errors import PlatformError

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(PlatformError):
    """A usage or keys command that can't run as asked; the message says the fix."""


def parse_since(text: str) -> float:
    """`24h`, `30m`, `7d`, `2w`, `90s` -> seconds."""
    m = DURATION.match(text or "")
    if not m:
        raise UsageError(f"--since {text!r}: write a number and a unit, e.g. 30m, 24h, 7d (units s, m, h, d, w)")
    return float(m.group(1)) * UNIT_S[m.group(2)]


def usage(
    since: str = typer.Option("24h", "--since", help="How far back: 30m, 24h, 7d, 2w."),
    by: str = typer.Option("key", "--by", help="Group by key, model, adapter or deployment."),
    db: str = typer.Option(None, "--db", envvar="PLATFORM_USAGE_DB",
                           help="Usage store (SQLAlchemy URL); default SQLite at $PLATFORM_HOME/usage.db."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Requests, prompt and completion tokens and errors, grouped by key, model, adapter or deployment."""
    from llmplatform.serving.usage import COUNTS, GROUPS, UsageStore, usage_db_url

    if by not in GROUPS:
        raise UsageError(f"--by {by!r}: use one of {', '.join(GROUPS)}")
    seconds = parse_since(since)
    url = db if db and db.lower() != "off" else usage_db_url({})
    if url is None:
        raise UsageError("PLATFORM_USAGE_DB is off: no usage is recorded; pass --db URL to read a store")
    store = UsageStore(url)
    try:
        rows = store.report(time.time() - seconds, by)
    finally:
        store.close()
    for r in rows:
        if by == "adapter" and not r["adapter"]:
            r["adapter"] = "(base)"
    columns = [by, *COUNTS] + (["replica_gpu_seconds"] if by == "deployment" else [])
    emit(rows, output, columns=columns)


keys_app = typer.Typer(help="API keys: make a key with a name and limits; only its hash is stored.", no_args_is_help=True)


@keys_app.command("add")
def keys_add(
    name: str = typer.Argument(..., help="The key's name in usage reports (letters, digits, - _ .)."),
    file: Path = typer.Option(..., "--file", "-f", help="The keys file to append to (a serve spec's auth.api_keys_file, or the Secret's `keys`)."),
    rpm: int = typer.Option(None, "--rpm", min=1, help="Requests per minute allowed, across all replicas (default: no limit)."),
    tpm: int = typer.Option(None, "--tpm", min=1, help="Prompt + completion tokens per minute allowed (default: no limit)."),
    rotate: bool = typer.Option(False, "--rotate", help="NAME exists: add a second key of the same identity and limits (remove the old line once clients moved)."),
) -> None:
    """Make a new key, print it once, and append `sha256:<hash> name=NAME [rpm=N] [tpm=N]` to FILE."""
    from llmplatform.serving.keys import KeysFormatError, add_key

    try:
        key = add_key(file, name, rpm, tpm, rotate)
    except KeysFormatError as exc:
        raise UsageError(str(exc)) from exc
    typer.echo(key)
    typer.echo(f"# added {name!r} to {file} (hash only); this is the only time the key is shown. Running replicas "
               "pick it up on its first request; on Kubernetes update the Secret from this file.", err=True)
