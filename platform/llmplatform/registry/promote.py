"""Promotion and rollback: move an MLflow alias, after gates, with a recorded history event.

`promote` evaluates every gate first and refuses (changing nothing) when any fails, with both
numbers in the message. A move is: read the current holder, set the alias (MLflow's set is
atomic; concurrent writers: last one wins), then write the event with a timestamp taken after
the set, then re-read the alias. If another writer moved it meanwhile, this event is marked
`superseded_by` that version: history keeps both, and the rollback walk follows the winner.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from llmplatform.errors import RegistryError
from llmplatform.registry import client as mc
from llmplatform.registry import gates as g
from llmplatform.registry.history import (PromotionRecord, default_actor, mark_superseded, now_utc, read_events,
                                          refresh_description, replay, write_event)
from llmplatform.specs import REGISTRY_URI


class PromotionRefused(RegistryError):
    """A gate failed; the alias was not moved. Carries every gate's result."""

    def __init__(self, message: str, results: list[g.GateResult]):
        self.results = results
        super().__init__(message)


def promote(tracking_uri: Any, name: str, version: int | str, alias: str, require: Iterable[str] = (),
            no_worse_than: str | None = None, actor: str | None = None, reason: str | None = None) -> PromotionRecord:
    """Point `name@alias` at `version` if every gate passes; returns the recorded event."""
    _check_alias(alias)
    version = int(version)
    reqs = g.parse_requirements(list(require))
    client = mc.connect(tracking_uri)
    mv = mc.get_version(client, name, version)
    if mv.status != "READY":
        raise RegistryError(f"{name} version {version} is {mv.status}, not READY; it cannot be promoted")
    results = gate_results(client, name, mv, reqs, no_worse_than)
    failed = [r for r in results if not r.passed]
    if failed:
        raise PromotionRefused(f"promotion of {name} version {version} to {alias!r} refused; {alias!r} unchanged:\n"
                               + "\n".join(f"  - {r.message}" for r in failed), results)
    holder = mc.alias_holder(client, name, alias)
    record = PromotionRecord(name=name, alias=alias, kind="promote", from_version=holder, to_version=version,
                             time=now_utc(), actor=default_actor(actor), reason=reason,
                             gates=[r.to_dict() for r in results])
    if holder == version:
        return PromotionRecord(**{**record.to_dict(), "changed": False})
    return _move(client, record)


def rollback(tracking_uri: Any, name: str, alias: str, actor: str | None = None,
             reason: str | None = None) -> PromotionRecord:
    """Move `name@alias` back to the version that held it before the current holder."""
    _check_alias(alias)
    client = mc.connect(tracking_uri)
    rm = mc.get_registered_model(client, name)
    holder = (rm.aliases or {}).get(alias)
    if holder is None:
        raise RegistryError(f"{name} has no alias {alias!r} (aliases: {_aliases_text(rm)}); nothing to roll back")
    holder = int(holder)
    events = read_events(rm, alias)
    if not events:
        raise RegistryError(f"{name}@{alias} has no promotion history; nothing to roll back to "
                            f"(promote a version explicitly with `platformctl models promote`)")
    target = rollback_target(replay(events), holder, name, alias)
    mc.get_version(client, name, target)  # a deleted previous holder gets a clear error
    record = PromotionRecord(name=name, alias=alias, kind="rollback", from_version=holder, to_version=target,
                             time=now_utc(), actor=default_actor(actor), reason=reason or f"rollback from v{holder}")
    return _move(client, record)


def rollback_target(stack: list[int], holder: int, name: str, alias: str) -> int:
    """The version below the current holder on the alias's undo stack."""
    if holder not in stack:
        raise RegistryError(f"{name}@{alias} points at version {holder}, which no recorded promotion put there "
                            "(moved outside platformctl?); set it with `platformctl models promote`")
    stack = stack[: len(stack) - stack[::-1].index(holder)]  # cut back to the holder's last entry
    if len(stack) < 2:
        raise RegistryError(f"{name}@{alias}: version {holder} is the first recorded holder; there is no earlier "
                            "version to roll back to")
    return stack[-2]


def gate_results(client, name: str, mv, reqs: list[g.Requirement], no_worse_than: str | None) -> list[g.GateResult]:
    """Every gate's result for version `mv` (requirements, then the comparison with an alias holder)."""
    version = int(mv.version)
    metrics = version_metrics(client, mv)
    results = g.check_requirements(reqs, metrics, version, name)
    if no_worse_than:
        _check_alias(no_worse_than)
        holder = mc.alias_holder(client, name, no_worse_than)
        if holder is None or holder == version:
            why = "has no holder yet" if holder is None else "is held by this version"
            results.append(g.GateResult(f"no-worse-than {no_worse_than}", True,
                                        f"gate no-worse-than {no_worse_than} skipped: {no_worse_than!r} {why}"))
        else:
            theirs = version_metrics(client, mc.get_version(client, name, holder))
            names = g.gate_metrics(reqs, metrics, theirs)
            results += g.check_no_worse(names, metrics, theirs, version, no_worse_than, holder, name)
    return results


def version_metrics(client, mv) -> dict[str, float]:
    """The version run's logged metrics, completed by the `metrics` given in its lineage, and the
    `eval.<dataset>.<metric>` tags evaluation jobs set on the version (`platformctl eval submit`)."""
    metrics = {}
    lineage_metrics = mc.untag_value((mv.tags or {}).get(f"{mc.LINEAGE_PREFIX}metrics", ""))
    if isinstance(lineage_metrics, dict):
        metrics.update({k: float(v) for k, v in lineage_metrics.items() if isinstance(v, (int, float))})
    metrics.update(mc.run_metrics(client, mv.run_id))
    metrics.update(g.eval_tag_metrics(mv.tags or {}))
    return metrics


def _move(client, record: PromotionRecord) -> PromotionRecord:
    """Set the alias, record the event, and detect a concurrent writer that won."""
    client.set_registered_model_alias(record.name, record.alias, str(record.to_version))
    try:
        record = write_event(client, PromotionRecord(**{**record.to_dict(), "time": now_utc()}))
    except Exception as exc:
        _restore(client, record)
        raise RegistryError(f"{record.name}@{record.alias}: could not record the {record.kind} ({exc}); "
                            f"the alias was put back to version {record.from_version}") from exc
    now = mc.alias_holder(client, record.name, record.alias)
    if now != record.to_version:
        record = mark_superseded(client, record, now)
    refresh_description(client, record.name)
    return record


def _restore(client, record: PromotionRecord) -> None:
    if record.from_version is None:
        client.delete_registered_model_alias(record.name, record.alias)
    else:
        client.set_registered_model_alias(record.name, record.alias, str(record.from_version))


def _check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not REGISTRY_URI.match(f"models:/x@{alias}") or alias.lower() == "latest" \
            or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(f"alias {alias!r} is not valid; use letters, digits, '_' and '-' (e.g. staging, "
                            "production); 'latest' and v<N> are reserved by MLflow")


def _aliases_text(rm) -> str:
    return ", ".join(f"{a}=v{v}" for a, v in sorted((rm.aliases or {}).items())) or "none"
