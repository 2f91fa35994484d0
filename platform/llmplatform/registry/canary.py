"""Canaries in the registry: start, re-weight, complete and abort, each recorded in the history.

The state of a canary on `NAME@ALIAS` is the registered-model tag `platform.canary.<ALIAS>` (JSON,
`canary_rules.CanaryState`), next to the alias it splits. Whoever follows the alias reads it from
the same place: the serving app's registry poller (every `registry_poll_s`) and, on Kubernetes,
every ingress replica of the RayService the operator deploys (the operator pins the alias holder
for the plan; the split is applied by the replicas, so a canary step never redeploys anything).

Events go to the promotion history with kinds `canary-start`, `canary-weight`, `canary-abort`;
completing moves the alias with an ordinary `promote` event (reason says "canary completed"), so
`models rollback` after a completed canary goes back to the baseline as after any promotion.
"""

from __future__ import annotations

import time
from typing import Any

from llmplatform.registry import client as mc
from llmplatform.registry import canary_rules as rules
from llmplatform.registry.history import PromotionRecord, default_actor, now_utc, refresh_description, write_event
from llmplatform.registry.promote import _check_alias, _move

CANARY_PREFIX = "platform.canary."  # registered-model tag per alias: the canary state as JSON


def read_state(registered_model, alias: str) -> rules.CanaryState | None:
    """The canary on `alias` of this registered model (None: no canary, or an unreadable tag)."""
    text = (registered_model.tags or {}).get(CANARY_PREFIX + alias)
    data = mc.untag_value(text) if text else None
    if not isinstance(data, dict):
        return None
    try:
        return rules.CanaryState.from_dict(data)
    except (KeyError, TypeError, ValueError, rules.CanaryError):
        return None


def state_of(tracking_uri: Any, name: str, alias: str) -> rules.CanaryState | None:
    """The canary on `name@alias` right now (what the serving poller reads)."""
    return read_state(mc.get_registered_model(mc.connect(tracking_uri), name), alias)


def start(tracking_uri: Any, name: str, version: int | str, alias: str, weight: float, guard: rules.Guard | None = None,
          actor: str | None = None, reason: str | None = None) -> PromotionRecord:
    """Start a canary: `weight`% of `name@alias` traffic to `version`, the rest to the holder."""
    _check_alias(alias)
    client = mc.connect(tracking_uri)
    mv = mc.get_version(client, name, version)
    if mv.status != "READY":
        raise rules.CanaryError(f"{name} version {version} is {mv.status}, not READY; it cannot be a canary")
    rm = mc.get_registered_model(client, name)
    holder = (rm.aliases or {}).get(alias)
    state = rules.start(read_state(rm, alias), name, alias, int(holder) if holder is not None else None, int(version),
                        weight, guard or rules.Guard(), time.time())
    client.set_registered_model_tag(name, CANARY_PREFIX + alias, mc.tag_value(state.to_dict()))
    return _record(client, name, alias, "canary-start", state.baseline, state.version, actor,
                   reason or f"canary of v{state.version} at {weight:g}%", state)


def set_weight(tracking_uri: Any, name: str, alias: str, weight: float, actor: str | None = None,
               reason: str | None = None) -> PromotionRecord:
    client = mc.connect(tracking_uri)
    state = rules.set_weight(read_state(mc.get_registered_model(client, name), alias), name, alias, weight)
    client.set_registered_model_tag(name, CANARY_PREFIX + alias, mc.tag_value(state.to_dict()))
    return _record(client, name, alias, "canary-weight", state.baseline, state.version, actor,
                   reason or f"canary of v{state.version} at {weight:g}%", state)


def complete(tracking_uri: Any, name: str, alias: str, version: int | None = None, actor: str | None = None,
             reason: str | None = None) -> PromotionRecord:
    """Move the alias to the canary's version (a `promote` event) and end the canary."""
    client = mc.connect(tracking_uri)
    state = rules.complete(read_state(mc.get_registered_model(client, name), alias), name, alias, version)
    holder = mc.alias_holder(client, name, alias)
    record = PromotionRecord(name=name, alias=alias, kind="promote", from_version=holder, to_version=state.version,
                             time=now_utc(), actor=default_actor(actor), reason=reason or "canary completed")
    record = _move(client, record)  # all traffic on the new holder first, then the split goes
    client.delete_registered_model_tag(name, CANARY_PREFIX + alias)
    return record


def abort(tracking_uri: Any, name: str, alias: str, reason: str | None = None, actor: str | None = None,
          missing_ok: bool = False) -> PromotionRecord | None:
    """End the canary; all traffic back on the holder (the alias never moved). None if there was
    none and `missing_ok` (two guard replicas aborting the same canary)."""
    client = mc.connect(tracking_uri)
    current = read_state(mc.get_registered_model(client, name), alias)
    if current is None and missing_ok:
        return None
    state = rules.complete(current, name, alias)  # same precondition: a canary must exist
    client.delete_registered_model_tag(name, CANARY_PREFIX + alias)
    return _record(client, name, alias, "canary-abort", state.version, state.baseline, actor,
                   reason or f"canary of v{state.version} aborted", state)


def _record(client, name: str, alias: str, kind: str, frm: int, to: int, actor: str | None, reason: str,
            state: rules.CanaryState) -> PromotionRecord:
    record = write_event(client, PromotionRecord(name=name, alias=alias, kind=kind, from_version=frm, to_version=to,
                                                 time=now_utc(), actor=default_actor(actor), reason=reason,
                                                 canary=state.to_dict()))
    refresh_description(client, name)
    return record


def rollback(tracking_uri: Any, name: str, alias: str, actor: str | None = None, reason: str | None = None) -> PromotionRecord:
    """`models rollback`: aborts the alias's canary when one runs, else moves the alias back."""
    from llmplatform.registry.promote import rollback as move_back

    if state_of(tracking_uri, name, alias) is not None:
        return abort(tracking_uri, name, alias, reason=reason or "canary aborted by rollback", actor=actor)
    return move_back(tracking_uri, name, alias, actor=actor, reason=reason)


def canaries(registered_model) -> dict[str, dict]:
    """Alias -> canary state (as a dict) of every alias with a canary (for `models show`)."""
    out = {}
    for alias in sorted(registered_model.aliases or {}):
        state = read_state(registered_model, alias)
        if state is not None:
            out[alias] = state.to_dict()
    return out
