"""`--target local` finds the running stack even when its health checks are slow for a moment
(two submits at once on a busy machine), and says which of the two it is when it can't."""

from __future__ import annotations

import pytest

from llmplatform.backends import local
from llmplatform.errors import JobError
from llmplatform.stack.lifecycle import ComponentStatus, StackInfo


def _info(healthy: bool, state: str = "running") -> StackInfo:
    return StackInfo(home="/h", ray_address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2", mlflow_url="http://127.0.0.1:3",
                     components=[ComponentStatus("ray", state, healthy, 10, "http://127.0.0.1:2", "/h/logs/ray.log"),
                                 ComponentStatus("mlflow", state, True if state == "running" else False, 11, "http://127.0.0.1:3")])


@pytest.fixture()
def statuses(monkeypatch):
    seen: list[StackInfo] = []

    def play(*infos: StackInfo):
        queue = list(infos)
        monkeypatch.setattr("llmplatform.stack.status", lambda home=None: seen.append(queue[0]) or (queue.pop(0) if len(queue) > 1 else queue[0]))
        monkeypatch.setattr(local.time, "sleep", lambda s: None)
        return seen

    return play


def test_a_running_stack_that_misses_a_health_check_is_waited_for(statuses):
    seen = statuses(_info(False), _info(False), _info(True))
    backend = local.local_backend()
    assert backend.target == "local" and len(seen) == 3


def test_a_running_stack_that_never_answers_is_named_with_its_log(statuses, monkeypatch):
    monkeypatch.setattr(local, "PATIENCE_S", 0.05)
    statuses(_info(False))
    with pytest.raises(JobError, match=r"is running but did not answer its health checks .* ray at http://127.0.0.1:2 \(log: /h/logs/ray.log\)"):
        local.local_backend()


def test_a_stopped_stack_says_start_it(statuses):
    statuses(_info(False, state="dead"))
    with pytest.raises(JobError, match="is not running: start it with `platformctl up`"):
        local.local_backend()
