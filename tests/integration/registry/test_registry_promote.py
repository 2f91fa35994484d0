"""Promotion, gates, history, rollback and concurrency against a real MLflow server, checked over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest

from llmplatform.errors import RegistryError
from llmplatform.registry import PromotionRefused, promote, resolve, rollback, show_model

pytestmark = pytest.mark.integration


def holder(reg, alias="production"):
    aliases = reg.client.get_registered_model(reg.name).aliases
    return int(aliases[alias]) if alias in aliases else None


def events(reg) -> list[dict]:
    tags = reg.client.get_registered_model(reg.name).tags
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith("platform.promotion.")]


def test_promote_without_gates_records_history(reg):
    v1 = reg.register(eval_loss=1.0)
    record = promote(reg.uri, reg.name, v1, "staging", reason="first try")
    assert (record.from_version, record.to_version, record.actor, record.kind) == (None, v1, "tester", "promote")
    assert holder(reg, "staging") == v1
    [event] = events(reg)
    assert (event["alias"], event["to_version"], event["reason"]) == ("staging", v1, "first try")
    assert event["time"].endswith("Z")
    assert resolve(reg.uri, f"models:/{reg.name}@staging").version == v1
    again = promote(reg.uri, reg.name, v1, "staging")
    assert not again.changed and len(events(reg)) == 1


def test_gates_pass_or_refuse_with_both_numbers_and_change_nothing(reg):
    v1, v2, v3 = reg.register(eval_loss=1.0, eval_acc=0.60), reg.register(eval_loss=0.8, eval_acc=0.70), reg.register(eval_loss=1.3, eval_acc=0.9)
    promote(reg.uri, reg.name, v1, "production", require=["eval_loss<=1.2"], no_worse_than="production")
    ok = promote(reg.uri, reg.name, v2, "production", require=["eval_loss<=1.2", "eval_acc>0.5"], no_worse_than="production")
    assert [(g["gate"], g["passed"]) for g in ok.gates] == [
        ("eval_loss<=1.2", True), ("eval_acc>0.5", True),
        ("no-worse-than production: eval_loss", True), ("no-worse-than production: eval_acc", True)]

    with pytest.raises(PromotionRefused) as err:
        promote(reg.uri, reg.name, v3, "production", require=["eval_loss<=1.2"])
    assert "eval_loss=1.3" in str(err.value) and "<= 1.2" in str(err.value)
    with pytest.raises(PromotionRefused) as err:
        promote(reg.uri, reg.name, v3, "production", no_worse_than="production")
    message = str(err.value)
    assert "eval_loss=1.3" in message and "eval_loss=0.8" in message and "version 2" in message  # both numbers
    assert "eval_acc" not in message  # v3 is better on accuracy: only the failed gate is reported
    with pytest.raises(PromotionRefused, match="no metric 'bleu'"):
        promote(reg.uri, reg.name, v2, "production", require=["bleu>=1"])
    assert holder(reg) == v2 and len(events(reg)) == 2  # refusals changed nothing


def test_rollback_walks_back_and_says_when_history_ends(reg):
    v1, v2, v3 = (reg.register(eval_loss=x) for x in (1.0, 0.9, 0.8))
    with pytest.raises(RegistryError, match="no alias 'production'"):
        rollback(reg.uri, reg.name, "production")
    reg.client.set_registered_model_alias(reg.name, "production", str(v1))  # set outside platformctl
    with pytest.raises(RegistryError, match="no promotion history"):
        rollback(reg.uri, reg.name, "production")
    for v in (v2, v3):
        promote(reg.uri, reg.name, v, "production")
    assert rollback(reg.uri, reg.name, "production").to_version == v2
    assert rollback(reg.uri, reg.name, "production", reason="bad answers").to_version == v1
    with pytest.raises(RegistryError, match="no earlier version"):
        rollback(reg.uri, reg.name, "production")
    assert holder(reg) == v1
    promote(reg.uri, reg.name, v3, "production")  # after rollbacks, undo goes to v1 (not to v2 again)
    assert rollback(reg.uri, reg.name, "production").to_version == v1
    kinds = [(e["kind"], e["from_version"], e["to_version"]) for e in events(reg)]
    assert kinds == [("promote", 1, 2), ("promote", 2, 3), ("rollback", 3, 2), ("rollback", 2, 1),
                     ("promote", 1, 3), ("rollback", 3, 1)]
    history = show_model(reg.uri, reg.name)["history"]
    assert [h["reason"] for h in history][3] == "bad answers"


CHILD = """
import sys
from llmplatform.registry import promote
promote(sys.argv[1], sys.argv[2], int(sys.argv[3]), "production", actor="proc-" + sys.argv[3])
"""


def test_concurrent_promotions_last_writer_wins_and_history_keeps_all(reg):
    versions = [reg.register(eval_loss=1.0) for _ in range(6)]
    promote(reg.uri, reg.name, versions[0], "production")
    threaded, spawned = versions[1:4], versions[4:]
    barrier, errors = threading.Barrier(len(threaded)), []

    def worker(v):
        try:
            barrier.wait()
            promote(reg.uri, reg.name, v, "production", actor=f"thread-{v}")
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, reg.uri, reg.name, str(v)], env=env) for v in spawned]
    threads = [threading.Thread(target=worker, args=(v,)) for v in threaded]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [p.wait(180) for p in procs] == [0] * len(spawned) and errors == []

    final = holder(reg)
    history = events(reg)
    assert sorted(e["to_version"] for e in history) == versions  # nobody's event was lost
    live = [e for e in history if e["superseded_by"] is None]
    assert live[-1]["to_version"] == final  # the winner is the last live event
    assert all(e["superseded_by"] in versions for e in history if e["superseded_by"] is not None)
    back = rollback(reg.uri, reg.name, "production")
    assert back.from_version == final and back.to_version in versions and back.to_version != final


def test_versions_aliases_and_history_are_visible_over_the_rest_api(reg):
    v1, v2 = reg.register(eval_loss=1.0), reg.register(eval_loss=0.9)
    promote(reg.uri, reg.name, v1, "production")
    promote(reg.uri, reg.name, v2, "production", require=["eval_loss<1"], reason="better loss")
    api = f"{reg.uri}/api/2.0/mlflow"
    with httpx.Client(timeout=30) as http:
        model = http.get(f"{api}/registered-models/get", params={"name": reg.name}).json()["registered_model"]
        found = http.get(f"{api}/model-versions/search", params={"filter": f"name='{reg.name}'"}).json()["model_versions"]
        alias = http.get(f"{api}/registered-models/alias", params={"name": reg.name, "alias": "production"}).json()
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {"production": str(v2)}
    history = sorted((t for t in model["tags"] if t["key"].startswith("platform.promotion.")), key=lambda t: t["key"])
    assert [json.loads(t["value"])["to_version"] for t in history] == [v1, v2]
    assert json.loads(history[1]["value"])["reason"] == "better loss"
    assert "Promotion history" in model["description"] and "better loss" in model["description"]
    assert sorted(int(v["version"]) for v in found) == [v1, v2]
    tags = {t["key"]: t["value"] for t in next(v for v in found if int(v["version"]) == v2)["tags"]}
    assert tags["platform.lineage.dataset_sha256"] == "d" * 64 and tags["platform.compat.target_modules"] == '["q_proj","v_proj"]'
    assert alias["model_version"]["version"] == str(v2)
