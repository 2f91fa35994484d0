"""Shared pieces for the fine-tuning integration tests: the pretrained llama2-tiny base (built
once into the normal model cache), a generated task dataset with a held-out split, and a way to
run `platformctl` against the session's real local stack (Ray head + MLflow server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The model cache the user's tiny models live in (so the pretrained base is built once)."""
    from llmplatform import paths

    return paths.model_cache()


@pytest.fixture(scope="session")
def tiny_base(model_cache) -> Path:
    """The pretrained tiny base; `PLATFORM_TEST_TINY_BASE=DIR` points at an already-built one."""
    override = os.environ.get("PLATFORM_TEST_TINY_BASE")
    if override:
        return Path(override)
    from llmplatform.tiny import ensure_tiny_model

    return ensure_tiny_model("base", model_cache)


@pytest.fixture(scope="session")
def base_name(tiny_base) -> str:
    """What the e2e specs name as base_model: the catalog name, or the override directory."""
    return str(tiny_base) if os.environ.get("PLATFORM_TEST_TINY_BASE") else "llama2-tiny"


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict[str, Path]:
    from llmplatform.tiny.tasks import write_task_dataset

    return write_task_dataset("reverse", tmp_path_factory.mktemp("reverse"), n_train=2000, n_eval=100, seed=0)


@pytest.fixture(scope="session")
def ctl_env(local_stack, model_cache) -> dict[str, str]:
    """Environment for `platformctl` talking to the session's stack."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(local_stack.client_env)
    env.update({"PLATFORM_HOME": str(local_stack.home), "PLATFORM_MODEL_CACHE": str(model_cache), "PYTHONUNBUFFERED": "1"})
    return env
