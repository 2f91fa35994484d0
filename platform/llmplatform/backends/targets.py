"""Pick the backend for a target name, or the one that a job record was submitted through."""

from __future__ import annotations

import os

from llmplatform.backends.base import JobRecord
from llmplatform.errors import JobError


def backend_for(target: str, tracking_uri: str | None = None):
    """The backend for `local` or `ray` (k8s goes through `llmplatform.backends.k8s`)."""
    if target == "local":
        from llmplatform.backends.local import local_backend

        return local_backend()
    if target == "ray":
        from llmplatform.backends.ray_jobs import RayJobsBackend
        from llmplatform.rayaddress import jobs_url

        address = jobs_url(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS (for --target ray)", JobError)
        return RayJobsBackend(address, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), target="ray")
    raise JobError(f"unknown target {target!r}; use local, ray or k8s")


def backend_of(record: JobRecord):
    """The backend a recorded job was submitted through (same address and tracking server)."""
    if record.target == "k8s":
        raise JobError(f"job {record.id} runs on Kubernetes: use kubectl or the k8s backend")
    from llmplatform.backends.ray_jobs import RayJobsBackend

    if not record.address:
        raise JobError(f"job {record.id} was never submitted (state {record.state})")
    env = {}
    if record.target == "local":
        from llmplatform import stack

        env = stack.status().client_env
    return RayJobsBackend(record.address, record.tracking_uri, target=record.target, env=env)
