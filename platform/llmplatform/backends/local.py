"""Fine-tuning jobs on the embedded local stack started by `platformctl up`.

The same Ray Jobs API path as `ray_jobs`, pointed at the local Ray head's dashboard and the
local MLflow server. The job runs this interpreter (`sys.executable`), inherits
`PLATFORM_HOME` and the model cache, and gets the base model resolved here (e.g. the cached
`llama2-tiny` directory) so workers never rebuild it.
"""

from __future__ import annotations

import os
import sys
import time

from llmplatform import paths
from llmplatform.backends.ray_jobs import RayJobsBackend
from llmplatform.errors import JobError


PATIENCE_S = 20.0  # a running stack's health checks may time out (2 s each) while the machine is busy


def _all_running(info) -> bool:
    """Every component of the stack has a live process of ours."""
    return bool(info.components) and all(c.state == "running" for c in info.components)


def _answering_stack(home: str | None):
    """The stack's status, polled for up to PATIENCE_S while its processes run but a health check
    fails (a busy 2-core machine: two submits at once made the dashboard miss a 2 s check)."""
    from llmplatform import stack

    deadline = time.monotonic() + PATIENCE_S
    info = stack.status(home)
    while not info.healthy and _all_running(info) and time.monotonic() < deadline:
        time.sleep(1.0)
        info = stack.status(home)
    return info


def local_backend(home: str | None = None) -> RayJobsBackend:
    """A backend bound to the running local stack; a clear error if it isn't running."""
    info = _answering_stack(home)
    slow = [c for c in info.components if c.state == "running" and not c.healthy]
    if slow and _all_running(info):
        raise JobError(f"the local stack in {info.home} is running but did not answer its health checks for {PATIENCE_S:.0f} s: "
                       + "; ".join(f"{c.name} at {c.url} (log: {c.log})" for c in slow) + "; retry, or `platformctl status`")
    if not info.dashboard_url or not info.healthy:
        raise JobError(f"the local stack in {info.home} is not running: start it with `platformctl up` (or use --target ray with RAY_ADDRESS)")
    env = {"PLATFORM_HOME": str(paths.platform_home()), "PLATFORM_MODEL_CACHE": str(paths.model_cache()), **info.client_env}
    if info.ray_address:
        env["RAY_ADDRESS"] = info.ray_address  # Ray Train's helper actors need it when several clusters run here
    for key in ("PLATFORM_GIT_SHA",):
        if os.environ.get(key):
            env[key] = os.environ[key]
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or info.mlflow_url
    return RayJobsBackend(info.dashboard_url, tracking, target="local", env=env, python=sys.executable, resolve_locally=True)
