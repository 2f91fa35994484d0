"""Cold starts as the ingress tells them: only a request that arrived before its replica started counts."""

from __future__ import annotations

from llmplatform.serving.coldstart import ColdStarts


def test_a_request_held_through_a_replica_start_is_the_last_cold_start():
    c = ColdStarts()
    assert not c.observe({"text": "x", "replica_started": 100.0, "replica_start_s": 3.0}, arrived=101.0, answered=101.2)  # warm replica
    assert not c.observe({"text": "x"}, arrived=50.0)  # an engine that doesn't say (older replica): not counted
    assert c.status() == {"last_cold_start": None, "cold_starts": 0}
    assert c.observe({"text": "x", "replica_started": 200.0, "replica_start_s": 7.5}, arrived=198.0, answered=208.25)
    assert c.status() == {"last_cold_start": {"at": 208.25, "waited_s": 10.25, "replica_start_s": 7.5}, "cold_starts": 1}
