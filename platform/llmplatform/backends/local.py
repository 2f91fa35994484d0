"""Fine-tuning jobs on the embedded local stack started by `platformctl up`.

The same Ray Jobs API path as `ray_jobs`, pointed at the local Ray head's dashboard and the
local MLflow server. The job runs this interpreter (`sys.executable`), inherits
`PLATFORM_HOME` and the model cache, and gets the base model resolved here (e.g. the cached
`llama2-tiny` directory) so workers never rebuild it.
"""

from __future__ import annotations

import os
import sys

from llmplatform import paths
from llmplatform.backends.ray_jobs import RayJobsBackend
from llmplatform.errors import JobError


def local_backend(home: str | None = None) -> RayJobsBackend:
    """A backend bound to the running local stack; a clear error if it isn't running."""
    from llmplatform import stack

    info = stack.status(home)
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
