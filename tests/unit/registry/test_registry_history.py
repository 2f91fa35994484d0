"""The rollback walk: replaying an alias's promotion/rollback events as an undo stack."""

from __future__ import annotations

import pytest

from llmplatform.errors import RegistryError
from llmplatform.registry.history import PromotionRecord, render_history, replay
from llmplatform.registry.promote import rollback_target
from llmplatform.registry.refs import parse_ref


def ev(kind, frm, to, superseded_by=None):
    return PromotionRecord(name="m", alias="production", kind=kind, from_version=frm, to_version=to,
                           time="2026-01-01T00:00:00Z", actor="t", superseded_by=superseded_by)


def test_promotions_stack_and_rollbacks_walk_back_without_becoming_targets():
    events = [ev("promote", None, 1), ev("promote", 1, 2), ev("promote", 2, 3)]
    assert replay(events) == [1, 2, 3]
    assert rollback_target(replay(events), 3, "m", "production") == 2
    events.append(ev("rollback", 3, 2))
    assert rollback_target(replay(events), 2, "m", "production") == 1
    events.append(ev("rollback", 2, 1))
    with pytest.raises(RegistryError, match="first recorded holder"):
        rollback_target(replay(events), 1, "m", "production")
    events.append(ev("promote", 1, 4))  # a new promotion after rollbacks: undo goes to 1, never to 3
    assert replay(events) == [1, 4]


def test_superseded_events_are_not_replayed_and_outside_moves_are_followed():
    events = [ev("promote", None, 1), ev("promote", 1, 2, superseded_by=3), ev("promote", 1, 3)]
    assert replay(events) == [1, 3]
    moved = [ev("promote", None, 1), ev("promote", 5, 6)]  # 1 -> 5 happened in the MLflow UI
    assert replay(moved) == [1, 5, 6]


def test_holder_unknown_to_history_is_refused():
    with pytest.raises(RegistryError, match="outside platformctl"):
        rollback_target([1, 2], 9, "m", "production")
    assert rollback_target([1, 2, 3], 2, "m", "production") == 1  # holder below the top: cut back to it


def test_history_table_is_newest_first():
    text = render_history([ev("promote", None, 1), ev("promote", 1, 2), ev("rollback", 2, 1)])
    rows = [line for line in text.splitlines() if line.startswith("| 2026")]
    assert [r.split("|")[3].strip() for r in rows] == ["rollback", "promote", "promote"]


def test_refs():
    assert (parse_ref("models:/bot@production").alias, parse_ref("models:/bot/7").version) == ("production", 7)
    with pytest.raises(RegistryError, match="models:/NAME@ALIAS"):
        parse_ref("bot:production")
