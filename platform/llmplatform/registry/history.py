"""Promotion history: one registered-model tag per event, and the rollback walk over it.

MLflow tags have no compare-and-swap, so history is never a read-modify-write list: every
promotion or rollback writes its own tag `platform.promotion.<utc-ns>-<random>` (sortable, no
collisions), whose value is the event as JSON. Concurrent writers therefore never lose each
other's events. The registered model's description carries a human-readable table of recent
events below a marker line, rebuilt from the tags after each event (a view, not the record).

The rollback walk replays one alias's events as a stack: a promotion pushes its target, a
rollback pops back to its target. Rolling back moves the alias to the entry below the current
holder, so repeated rollbacks walk further back and rollbacks never become targets themselves.
Events marked `superseded_by` (a concurrent promotion overwrote the alias before this one
could be confirmed) are shown in the history but not replayed.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

from llmplatform.registry import client as mc

HISTORY_MARKER = "<!-- platform:promotion-history (rebuilt by platformctl; edit above this line) -->"
DESCRIPTION_ROWS = 25


@dataclass(frozen=True)
class PromotionRecord:
    """One promotion or rollback of an alias, as stored and as `models show` prints it."""

    name: str
    alias: str
    kind: str                      # "promote" | "rollback" | "canary-start" | "canary-weight" | "canary-abort"
    from_version: int | None       # holder before the move (None: the alias was new)
    to_version: int
    time: str                      # ISO 8601, UTC
    actor: str
    reason: str | None = None
    gates: list[dict] = field(default_factory=list)
    key: str | None = None         # the tag holding this event (None: nothing was changed)
    superseded_by: int | None = None
    changed: bool = True
    canary: dict | None = None     # canary events: the canary state after the step (canary_rules.CanaryState)

    def to_dict(self) -> dict:
        return asdict(self)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def default_actor(actor: str | None = None) -> str:
    if actor or os.environ.get("USER") or os.environ.get("LOGNAME"):
        return actor or os.environ.get("USER") or os.environ["LOGNAME"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def new_event_key() -> str:
    """`platform.promotion.<19-digit utc ns>-<8 hex>`: sorts by time, unique across writers."""
    return f"{mc.EVENT_PREFIX}{time.time_ns():019d}-{secrets.token_hex(4)}"


MAX_REASON = 2000  # characters kept of --reason (tag values are limited; the gist fits)


def write_event(client, record: PromotionRecord) -> PromotionRecord:
    """Store the event under a fresh key; returns the record with its key."""
    reason = record.reason[:MAX_REASON] if record.reason else record.reason
    record = replace(record, key=record.key or new_event_key(), reason=reason)
    payload = {k: v for k, v in record.to_dict().items() if k not in ("key", "name", "changed")}
    client.set_registered_model_tag(record.name, record.key, mc.tag_value(payload))
    return record


def mark_superseded(client, record: PromotionRecord, holder: int | None) -> PromotionRecord:
    """Rewrite this event (only its writer touches its key) to say another move won the race."""
    record = replace(record, superseded_by=holder)
    payload = {k: v for k, v in record.to_dict().items() if k not in ("key", "name", "changed")}
    client.set_registered_model_tag(record.name, record.key, mc.tag_value(payload))
    return record


def read_events(registered_model, alias: str | None = None) -> list[PromotionRecord]:
    """Every stored event of a registered model (optionally one alias), oldest first."""
    events = []
    for key, value in sorted((registered_model.tags or {}).items()):
        if not key.startswith(mc.EVENT_PREFIX):
            continue
        try:
            data = json.loads(value)
            record = PromotionRecord(name=registered_model.name, key=key, **data)
        except (ValueError, TypeError):
            continue  # a tag someone edited by hand: skipped, never fatal
        if alias is None or record.alias == alias:
            events.append(record)
    return events


def replay(events: list[PromotionRecord]) -> list[int]:
    """The alias's undo stack after these events (one alias, oldest first); top = holder."""
    stack: list[int] = []
    for e in events:
        if e.superseded_by is not None or e.kind.startswith("canary-"):
            continue  # canary steps never move the alias (completing one is a "promote" event)
        if e.kind == "rollback":
            while stack and stack[-1] != e.to_version:
                stack.pop()
            stack = stack or [e.to_version]
            continue
        if e.from_version is not None and (not stack or stack[-1] != e.from_version):
            stack.append(e.from_version)  # first event, or the alias was moved outside platformctl
        if not stack or stack[-1] != e.to_version:
            stack.append(e.to_version)
    return stack


def render_history(events: list[PromotionRecord], rows: int = DESCRIPTION_ROWS) -> str:
    """A markdown table of the latest events, newest first (what the MLflow UI shows)."""
    lines = ["### Promotion history (newest first)", "",
             "| time (UTC) | alias | kind | from | to | actor | reason |", "|---|---|---|---|---|---|---|"]
    for e in list(reversed(events))[:rows]:
        note = f" (superseded by v{e.superseded_by})" if e.superseded_by is not None else ""
        reason = (e.reason or "").replace("|", "/").replace("\n", " ")[:120]
        frm = f"v{e.from_version}" if e.from_version is not None else "-"
        lines.append(f"| {e.time} | {e.alias} | {e.kind}{note} | {frm} | v{e.to_version} | {e.actor} | {reason} |")
    if len(events) > rows:
        lines.append(f"\n{len(events) - rows} older event(s): `platformctl models show {events[0].name}`")
    return "\n".join(lines)


def refresh_description(client, name: str) -> None:
    """Rebuild the history table in the description from the tags (user text above the marker stays)."""
    rm = mc.get_registered_model(client, name)
    head = (rm.description or "").split(HISTORY_MARKER)[0].rstrip()
    text = f"{head}\n\n{HISTORY_MARKER}\n{render_history(read_events(rm))}".lstrip()
    client.update_registered_model(name, description=text)
