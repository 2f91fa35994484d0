"""Fixtures for the data tests: the real llama2-tiny tokenizer, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-init llama2-tiny checkpoint dir (tokenizer.model + config), built in seconds."""
    from llmplatform.tiny import ensure_tiny_model

    return ensure_tiny_model("random", tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))
