"""What a fine-tune consumed: GPU-hours and CPU core-hours (workers x devices per worker x wall
time, as the resolved plan reserved them) and trained tokens (non-pad input tokens over all
workers), cumulative over the job's attempts.

Rank 0 adds each step's tokens and logs `metrics()` with the step's other metrics, so they reach
MLflow (`gpu_hours`, `cpu_core_hours`, `trained_tokens`) and `platformctl finetune status`. A
resumed attempt starts from the values its MLflow run already holds, so a restart adds to them.
"""

from __future__ import annotations

import time

NAMES = ("gpu_hours", "cpu_core_hours", "trained_tokens")


class ResourceMeter:
    def __init__(self, workers: int, gpus_per_worker: float, cpus_per_worker: float, base: dict | None = None,
                 started: float | None = None, clock=time.perf_counter):
        self.gpus = workers * gpus_per_worker  # devices held while the workers live
        self.cpus = workers * cpus_per_worker
        self.clock = clock
        self.started = clock() if started is None else started
        base = base or {}
        self.base = {n: float(base.get(n, 0.0)) for n in NAMES}
        self.tokens = 0.0

    def add_tokens(self, n: float) -> None:
        self.tokens += n

    def metrics(self) -> dict[str, float]:
        hours = (self.clock() - self.started) / 3600.0
        return {"gpu_hours": self.base["gpu_hours"] + self.gpus * hours,
                "cpu_core_hours": self.base["cpu_core_hours"] + self.cpus * hours,
                "trained_tokens": self.base["trained_tokens"] + self.tokens}
