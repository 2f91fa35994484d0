"""Shared, session-scoped fixtures for real local services. Use them; don't start your own.

- `mlflow_server` -> str: the tracking URI (http://127.0.0.1:PORT) of a real `mlflow server`
  (SQLite + artifacts proxied over HTTP) in its own tmp dir on a free port, started once per
  session and stopped (whole process group) at the end. If `PLATFORM_TEST_MLFLOW_URI` is set,
  that URI is yielded instead and nothing is started. The fixture does NOT set
  MLFLOW_TRACKING_URI; pass the URI to `MlflowClient(uri)` / `mlflow.set_tracking_uri(uri)`
  or `monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)` in your test.
- `local_stack` -> llmplatform.stack.StackInfo: a full `llmplatform.stack.up()` (Ray head with
  dashboard/Jobs API + MLflow server) in a tmp PLATFORM_HOME on free ports; `.ray_address`
  ("127.0.0.1:PORT" for `ray.init(address=...)`), `.dashboard_url` (Jobs API base),
  `.mlflow_url` (tracking URI), `.home`, `.client_env` (env for Ray clients, e.g.
  RAY_AUTH_MODE). `down()` runs at session end. It does not change os.environ either.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


SESSION_MODEL_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    """One model cache for the whole session (and the Ray/Serve processes tests start), so the
    pretrained llama2-tiny base is built once, not once per temporary PLATFORM_HOME. It is the
    user's normal cache unless PLATFORM_MODEL_CACHE is already set."""
    from llmplatform import paths

    os.environ.setdefault("PLATFORM_MODEL_CACHE", str(paths.model_cache()))
    config.stash[SESSION_MODEL_CACHE] = os.environ["PLATFORM_MODEL_CACHE"]


@pytest.fixture(scope="module", autouse=True)
def session_model_cache_env(pytestconfig) -> Path:
    """Each module runs with the session's model cache in PLATFORM_MODEL_CACHE (restored after it).

    A session fixture may point it elsewhere for its own directory (serving's `serving_env` uses a
    temporary cache, and overrides this fixture there); that must not follow the later modules:
    the KubeRay pods take the variable from this process, and the k8s and unit tests that need the
    pretrained llama2-tiny then built it again in serving's cache (~90 s of CI)."""
    cache = pytestconfig.stash[SESSION_MODEL_CACHE]
    before = os.environ.get("PLATFORM_MODEL_CACHE")
    os.environ["PLATFORM_MODEL_CACHE"] = cache
    try:
        yield Path(cache)
    finally:
        if before is None:
            os.environ.pop("PLATFORM_MODEL_CACHE", None)
        else:
            os.environ["PLATFORM_MODEL_CACHE"] = before


@pytest.fixture(scope="session")
def may_lower_nice() -> bool:
    """Whether this user may set a nice below 0 (root, or RLIMIT_NICE >= 30: 20 - rlimit is the lowest allowed)."""
    import resource

    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 30


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """Tracking URI of a real MLflow server for this test session (see module docstring)."""
    reuse = os.environ.get("PLATFORM_TEST_MLFLOW_URI")
    if reuse:
        yield reuse
        return
    from llmplatform.stack import mlflow_server as server
    from llmplatform.stack.ports import free_port

    data_dir = tmp_path_factory.mktemp("mlflow")
    record, url = server.run_mlflow(data_dir, free_port(), data_dir / "mlflow.log")
    try:
        yield url
    finally:
        server.stop_mlflow(record)


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory):
    """StackInfo of a full local stack (Ray head + MLflow) in a tmp PLATFORM_HOME (see module docstring)."""
    from llmplatform import stack
    from llmplatform.stack.ports import free_port

    # a short home: Ray's temp dir is derived from it but lives under /tmp anyway
    home = Path(tempfile.mkdtemp(prefix="lps", dir=tmp_path_factory.getbasetemp()))
    info = stack.up(home, ray_port=free_port(), dashboard_port=free_port(), mlflow_port=free_port())
    try:
        yield info
    finally:
        stack.down(home)
