"""Where the platform keeps its state on this machine.

`PLATFORM_HOME` (default `~/.llm-platform`) holds the embedded stack's state file, logs,
MLflow's SQLite database and artifacts, Ray's temp dir, job records, and the model cache.
Functions only compute paths; callers create directories when they write.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.llm-platform"


def platform_home() -> Path:
    """The state directory: `$PLATFORM_HOME`, else `~/.llm-platform`."""
    return Path(os.environ.get("PLATFORM_HOME") or DEFAULT_HOME).expanduser().resolve()


def model_cache() -> Path:
    """Generated and downloaded model files: `$PLATFORM_MODEL_CACHE`, else `<home>/models`."""
    env = os.environ.get("PLATFORM_MODEL_CACHE")
    return Path(env).expanduser().resolve() if env else platform_home() / "models"


def jobs_dir() -> Path:
    return platform_home() / "jobs"
