"""Fixtures for the training unit tests: a random-init llama2-tiny and a small task dataset."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmplatform.tiny import ensure_tiny_model

    return ensure_tiny_model("random", tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llmplatform.tiny.tasks import write_task_dataset

    return write_task_dataset("reverse", tmp_path_factory.mktemp("task"), n_train=64, n_eval=16, seed=0)


@pytest.fixture()
def spec_for(tiny_random_dir, task_files):
    """Build a FineTuneSpec over the tiny model and task data, with overrides."""
    from llmplatform.specs import parse_spec

    def make(**sections):
        body = {
            "name": "unit", "base_model": str(tiny_random_dir),
            "data": {"train": str(task_files["train"]), "validation": str(task_files["eval"]), "max_seq_length": 64},
            "lora": {"dropout": 0.0},
        }
        for key, value in sections.items():
            body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
        return parse_spec("finetune", body)

    return make
