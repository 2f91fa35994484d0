"""A sweep's cluster, from its trials' resolved plans (pure).

Each trial of a sweep is resolved like any fine-tune (`resolve_finetune`); what the sweep adds is
the size of the one Ray cluster that runs them: a worker group with room for the `max_concurrent`
largest trials at once, every pod big enough for any trial's pod. The operator sizes the RayJob
from this, so the trials it runs never wait for pods it did not ask for.
"""

from __future__ import annotations

from llmplatform.resolve.document import Resolved


def sweep_pods(trials: list[Resolved], max_concurrent: int) -> dict:
    """Worker pods for a sweep: the pods of the `max_concurrent` largest trials, each pod the largest
    of any trial's (CPUs, memory, GPUs, workers per pod)."""
    if not trials:
        raise ValueError("a sweep has at least one trial")
    layouts = [t["pods"] for t in trials]
    running = sorted(layouts, key=lambda p: p["pods"], reverse=True)[: max(1, min(max_concurrent, len(layouts)))]
    widest = {k: max(p[k] for p in layouts) for k in ("workers_per_pod", "gpus_per_pod", "cpus_per_pod", "memory_gb_per_pod")}
    return {"pods": sum(p["pods"] for p in running), "concurrent_trials": len(running), **widest}
