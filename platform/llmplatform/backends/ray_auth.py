"""Give this process's Ray client (ray.init, the Jobs API, Serve) the env of the cluster it calls.

Ray reads `RAY_AUTH_MODE` / `RAY_AUTH_TOKEN_PATH` into a per-process config and token cache the
first time anything asks, and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` (0: the node address stays
127.0.0.1) into a constant at import, so setting the env vars later does nothing by itself:
`use_client_env` sets them and refreshes what Ray already read. The local stack records the env its clients need
(`StackInfo.client_env`, see llmplatform.stack.ray_head).
"""

from __future__ import annotations

import os
import sys

AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")


def use_client_env(env: dict[str, str]) -> None:
    """Put the RAY_* entries of `env` into os.environ (overriding the caller's) for this process's Ray client.

    A token file named by RAY_AUTH_TOKEN_PATH wins over a RAY_AUTH_TOKEN left in the shell."""
    wanted = {k: v for k, v in env.items() if k.startswith("RAY_")}
    if "RAY_AUTH_TOKEN_PATH" in wanted and "RAY_AUTH_TOKEN" not in wanted:
        os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(wanted)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in wanted:
        constants.ENABLE_RAY_CLUSTER = wanted["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")
    if any(k in AUTH_KEYS for k in wanted):
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")  # re-read RAY_AUTH_MODE (what Ray's own token setup does)
        AuthenticationTokenLoader.instance().reset_cache()
