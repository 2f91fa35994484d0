"""Cold starts seen by the ingress: a request that reached the ingress before the engine replica
answering it had started was held while that replica came up (scale from zero with
`min_replicas: 0`, or an upscale). The engine replica tags each request's first event with when it
started and how long its start took (`replica_started`, `replica_start_s`); `serve status` shows
the last cold start (`last_cold_start`) and how many there were.
"""

from __future__ import annotations

import time


class ColdStarts:
    """The last cold start and the count, in the ingress replica (wall-clock seconds)."""

    def __init__(self) -> None:
        self.count = 0
        self.last: dict | None = None

    def observe(self, first_event: dict, arrived: float, answered: float | None = None) -> bool:
        """Record a cold start if the replica that sent `first_event` started after the request
        `arrived` (time.time()); returns whether it was one."""
        started = first_event.get("replica_started")
        if started is None or started <= arrived:
            return False
        answered = time.time() if answered is None else answered
        self.count += 1
        self.last = {"at": round(answered, 3), "waited_s": round(answered - arrived, 3),  # the held request's wait to its first token
                     "replica_start_s": first_event.get("replica_start_s")}  # the replica's own start (model load)
        return True

    def status(self) -> dict:
        return {"last_cold_start": self.last, "cold_starts": self.count}


def running_engine_replicas(app_name: str) -> int:
    """RUNNING replicas of the application's `engine` deployment, from the Serve controller (no
    request reaches the engine, so asking does not scale it up from zero)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    engine = app.deployments.get("engine") if app else None
    if engine is None:
        return 0
    return sum(n for state, n in engine.replica_states.items() if str(state).rsplit(".", 1)[-1] == "RUNNING")
