"""A fine-tune's GPU-hours, CPU core-hours and trained tokens: workers x devices x wall time, cumulative over attempts."""

from __future__ import annotations

import pytest

from llmplatform.backends.base import JobRecord
from llmplatform.cli.finetune import result_text
from llmplatform.training.resource_usage import ResourceMeter


def test_hours_are_workers_times_devices_times_wall_time_and_a_resumed_attempt_adds_to_the_run() -> None:
    now = [1000.0]
    meter = ResourceMeter(workers=4, gpus_per_worker=2, cpus_per_worker=8, started=1000.0, clock=lambda: now[0])
    meter.add_tokens(5000)
    now[0] += 1800  # half an hour
    assert meter.metrics() == {"gpu_hours": pytest.approx(4.0), "cpu_core_hours": pytest.approx(16.0), "trained_tokens": 5000}
    resumed = ResourceMeter(4, 2, 8, base=meter.metrics(), started=now[0], clock=lambda: now[0])
    now[0] += 900
    resumed.add_tokens(100)
    assert resumed.metrics() == {"gpu_hours": pytest.approx(6.0), "cpu_core_hours": pytest.approx(24.0), "trained_tokens": 5100}


def test_finetune_status_shows_what_the_job_consumed() -> None:
    record = JobRecord(id="j1", name="rev", target="local", state="succeeded", step=10, total=10,
                       metrics={"loss": 1.0, "gpu_hours": 0.5, "cpu_core_hours": 2.25, "trained_tokens": 40960.0})
    text = result_text(record)
    assert "gpu_hours            0.5000" in text and "cpu_core_hours       2.2500" in text and "trained_tokens       40960" in text
