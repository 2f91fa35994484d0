"""Hugging Face datasets by name (`hf://datasets/OWNER/NAME`), loaded offline from a prepared `datasets` cache.

Nothing here reaches the network: offline mode is on and every cache lives under tmp_path. The
in-process tests set the environment and `datasets`' config (read once at import, as `datasets`'
own tests patch it); the CLI test runs `platformctl` in a fresh process with only the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmplatform.data import dataset_sha256, load_records, validate_dataset
from llmplatform.data.hub import is_hub_dataset, parse_hub_uri
from llmplatform.errors import DataError

from datatest_helpers import chat, save_to_datasets_cache

COMMIT = "1234567890abcdef" * 2 + "12345678"
TRAIN = [
    chat("What is 2 + 3?", "5"),
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {"messages": [{"role": "user", "content": "Old question"}, {"role": "assistant", "content": "old answer", "weight": 0},
                  {"role": "user", "content": "New question"}, {"role": "assistant", "content": "new answer"}]},
]
TEST = [chat("Spell cat", "c a t")]  # a dataset's splits share one set of columns


def _offline_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "hf-home"
    return {"HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty `datasets` cache under tmp_path, offline mode on, for this process."""
    import datasets
    import huggingface_hub.constants

    env = _offline_env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cache = Path(env["HF_DATASETS_CACHE"])
    cache.mkdir(parents=True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture()
def tiny_hub(hf_cache) -> Path:
    save_to_datasets_cache(hf_cache, "acme/tiny-chat", {"train": TRAIN, "test": TEST}, commit=COMMIT)
    return hf_cache


def test_uri_syntax():
    assert parse_hub_uri("hf://datasets/acme/tiny-chat").split == "train"
    ds = parse_hub_uri(f"hf://datasets/acme/tiny-chat?split=test&revision={COMMIT}&config=default")
    assert (ds.repo_id, ds.split, ds.revision, ds.config) == ("acme/tiny-chat", "test", COMMIT, "default")
    assert is_hub_dataset("hf://datasets/acme/tiny-chat?split=test")
    assert not is_hub_dataset("hf://datasets/acme/tiny-chat/data/train.jsonl")  # one file in the repo: fsspec's
    for bad, reason in [("hf://datasets/acme/tiny-chat@v1", "?revision=v1"), ("hf://datasets/acme/tiny-chat?splt=train", "unknown query parameter 'splt'"),
                        ("hf://datasets/acme/tiny-chat?split=", "empty 'split'")]:
        with pytest.raises(DataError, match=reason.replace("?", r"\?")):
            parse_hub_uri(bad)


def test_loads_a_cached_dataset_offline_with_index_locations(tiny_hub):
    records = load_records("hf://datasets/acme/tiny-chat")
    assert [(r.location, r.shape) for r in records] == [("index 0", "chat"), ("index 1", "sharegpt"), ("index 2", "chat")]
    assert records[1].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert [m.get("weight") for m in records[2].messages] == [None, 0, None, None]
    test = load_records("hf://datasets/acme/tiny-chat?split=test")
    assert [(r.location, r.shape, r.messages[1]) for r in test] == [("index 0", "chat", {"role": "assistant", "content": "c a t"})]
    assert len(load_records("hf://datasets/acme/tiny-chat?split=train[:2]")) == 2
    assert len(load_records(f"hf://datasets/acme/tiny-chat?split=train+test&revision={COMMIT}")) == 4


def test_lineage_sha_is_stable_and_tells_splits_apart(tiny_hub):
    sha = dataset_sha256("hf://datasets/acme/tiny-chat")
    assert len(sha) == 64 and sha == dataset_sha256("hf://datasets/acme/tiny-chat?split=train")
    assert sha != dataset_sha256("hf://datasets/acme/tiny-chat?split=test")


def test_bad_records_in_a_hub_dataset_are_reported_by_index(hf_cache):
    rows = [chat("q", "a"),
            {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
            chat("q", "a"),
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
            {"prompt": "p", "completion": ""}]
    save_to_datasets_cache(hf_cache, "acme/messy", {"train": rows})
    with pytest.raises(DataError) as err:
        load_records("hf://datasets/acme/messy")
    assert [p.location for p in err.value.problems] == ["index 1: conversations[1]", "index 3", "index 4"]
    assert "unknown 'from' value 'robot'" in str(err.value) and "nothing to train" in str(err.value)


def test_unknown_split_names_the_available_ones(tiny_hub):
    with pytest.raises(DataError) as err:
        load_records("hf://datasets/acme/tiny-chat?split=validation")
    (problem,) = err.value.problems
    assert problem.location == "split" and "no split 'validation'" in problem.message and problem.accepted == "train, test"


def test_a_dataset_missing_from_the_cache_offline_says_where_and_how_to_fetch(hf_cache):
    with pytest.raises(DataError) as err:
        load_records("hf://datasets/acme/not-fetched?revision=v2")
    text = str(err.value)
    assert "'acme/not-fetched' is not in the datasets cache" in text and str(hf_cache) in text
    assert "offline mode is on" in text and "datasets.load_dataset('acme/not-fetched', revision='v2')" in text


def test_an_other_cached_commit_than_the_revision_asked_for_is_refused(tiny_hub):
    assert len(load_records(f"hf://datasets/acme/tiny-chat?revision={COMMIT}")) == 3
    other = "f" * 40
    with pytest.raises(DataError) as err:
        load_records(f"hf://datasets/acme/tiny-chat?revision={other}")
    assert f"is commit {COMMIT}, not the revision asked for" in str(err.value)


def test_validate_reports_shapes_and_the_lineage_sha(tiny_hub, tokenizer):
    report = validate_dataset("hf://datasets/acme/tiny-chat", tokenizer, max_len=64)
    assert report.records == 3 and report.shapes == {"chat": 2, "sharegpt": 1}
    assert report.sha256 == dataset_sha256("hf://datasets/acme/tiny-chat")


def test_cli_validates_a_hub_dataset_in_a_fresh_offline_process(tmp_path, tiny_dir):
    env = {**os.environ, **_offline_env(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    cache = Path(env["HF_DATASETS_CACHE"])
    save_to_datasets_cache(cache, "acme/tiny-chat", {"train": TRAIN, "test": TEST}, commit=COMMIT)

    def platformctl(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "llmplatform.cli.main", "data", "validate", *args, "--tokenizer", str(tiny_dir), "-o", "json"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    done = platformctl("hf://datasets/acme/tiny-chat?split=train")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["valid"] and body["records"] == 3 and body["shapes"] == {"chat": 2, "sharegpt": 1}
    done = platformctl("hf://datasets/acme/elsewhere")
    assert done.returncode == 1
    body = json.loads(done.stdout)
    assert "not in the datasets cache" in body["problems"][0]["reason"] and str(cache) in body["problems"][0]["reason"]
