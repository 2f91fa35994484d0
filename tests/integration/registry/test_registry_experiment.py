"""`registry.client.experiment_id` on a real MLflow server: jobs submitted at once to a fresh
server all get the one experiment (CI 2026-12-05: two `finetune submit`s racing to create
`llm-platform`, the loser failed with RESOURCE_ALREADY_EXISTS)."""

from __future__ import annotations

import threading
import uuid

import pytest

pytestmark = pytest.mark.integration


def test_concurrent_first_uses_all_get_the_same_experiment(mlflow_server):
    from llmplatform.registry.client import connect, experiment_id

    name = f"race-{uuid.uuid4().hex[:8]}"
    barrier, results, errors = threading.Barrier(6), [], []

    def first_use():
        client = connect(mlflow_server)
        barrier.wait()
        try:
            results.append(experiment_id(client, name))
        except Exception as exc:  # recorded for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 6 and len(set(results)) == 1
    assert connect(mlflow_server).get_experiment_by_name(name).experiment_id == results[0]


def test_losing_the_race_reads_the_winners_experiment(mlflow_server):
    """The loser's view: no experiment when it looked, then the create fails because another job's
    create landed in between."""
    from llmplatform.registry.client import connect, experiment_id

    name = f"late-{uuid.uuid4().hex[:8]}"
    real = connect(mlflow_server)

    class LookedTooEarly:
        def __init__(self):
            self.looked = 0

        def get_experiment_by_name(self, n):
            self.looked += 1
            if self.looked == 1:
                real.create_experiment(n)  # the other job wins right after our lookup
                return None
            return real.get_experiment_by_name(n)

        def create_experiment(self, n):
            return real.create_experiment(n)

    assert experiment_id(LookedTooEarly(), name) == real.get_experiment_by_name(name).experiment_id
