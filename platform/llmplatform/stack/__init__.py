"""The embedded local stack: a Ray head and an MLflow tracking server on 127.0.0.1.

    from llmplatform import stack
    info = stack.up()              # idempotent; waits until both are healthy
    info.ray_address, info.dashboard_url, info.mlflow_url
    stack.tracking_uri()           # $MLFLOW_TRACKING_URI, else the running stack's
    stack.ray_address()            # $RAY_ADDRESS, else the running stack's
    stack.down()                   # stops what `up` started; MLflow data stays on disk

State lives in `$PLATFORM_HOME/stack.json` (see state.py); processes are managed by process
group (processes.py); ports by ports.py.
"""

from llmplatform.stack.lifecycle import (
    ComponentStatus,
    StackInfo,
    client_env_for,
    down,
    ray_address,
    status,
    tracking_uri,
    up,
)
from llmplatform.stack.ports import free_port

__all__ = ["ComponentStatus", "StackInfo", "client_env_for", "down", "free_port", "ray_address", "status", "tracking_uri", "up"]
