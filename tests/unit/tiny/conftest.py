"""Session fixtures for llama2-tiny tests: one random-init checkpoint built in a tmp cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_random(tiny_cache):
    from llmplatform.tiny import ensure_tiny_model

    return ensure_tiny_model("random", tiny_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_random):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_random)
