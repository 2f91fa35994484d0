"""ensure_tiny_model: loadable HF checkpoints, deterministic, safe under concurrent callers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmplatform import basemodels, catalog
from llmplatform.errors import PlatformError
from llmplatform.tiny import cache, ensure_tiny_model
from llmplatform.tiny.model import weights_digest


def test_random_checkpoint_loads_and_generates(tiny_random, tiny_tokenizer):
    assert cache.is_complete(tiny_random)
    model = AutoModelForCausalLM.from_pretrained(tiny_random)
    shape = catalog.get_model("llama2-tiny")
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (shape.vocab, shape.hidden, shape.ffn)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (shape.layers, shape.heads, shape.kv_heads)
    inputs = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                                return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    again = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, again)


def test_two_builds_in_two_caches_are_identical(tiny_random, tmp_path):
    other = ensure_tiny_model("random", tmp_path)
    assert other.name == tiny_random.name  # same content key
    assert (other / "tokenizer.model").read_bytes() == (tiny_random / "tokenizer.model").read_bytes()
    a = AutoModelForCausalLM.from_pretrained(tiny_random)
    b = AutoModelForCausalLM.from_pretrained(other)
    assert weights_digest(a) == weights_digest(b)
    assert json.loads((other / "tiny.json").read_text())["weights_sha256"] == weights_digest(a)


def test_second_call_reuses_the_cache(tiny_random, tiny_cache):
    before = (tiny_random / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("random", tiny_cache) == tiny_random
    assert (tiny_random / "model.safetensors").stat().st_mtime_ns == before


def test_concurrent_builds_from_two_processes_leave_one_valid_checkpoint(tmp_path):
    code = ("import sys; from llmplatform.tiny import ensure_tiny_model; "
            "print(ensure_tiny_model('random', sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    built = Path(paths.pop())
    assert cache.is_complete(built)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [built.name]
    AutoModelForCausalLM.from_pretrained(built)


def test_an_interrupted_build_is_rebuilt(tiny_random, tmp_path):
    leftover = cache.checkpoint_dir("random", tmp_path)
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")  # as if killed mid-write
    built = ensure_tiny_model("random", tmp_path)
    assert built == leftover and cache.is_complete(built)
    assert (built / "model.safetensors").read_bytes() == (tiny_random / "model.safetensors").read_bytes()


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(PlatformError, match="random, base"):
        ensure_tiny_model("huge", tmp_path)


def test_basemodels_locate_maps_tiny_names_directories_and_catalog_names(tiny_random, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PLATFORM_MODEL_CACHE", str(tiny_cache))
    assert basemodels.locate("llama2-tiny-random") == str(tiny_random)
    assert basemodels.identity("llama2-tiny-random") == str(tiny_random.resolve())  # nothing built
    assert basemodels.tokenizer_location("llama2-tiny") == str(tiny_random)  # every tiny kind shares it
    assert basemodels.locate(str(tmp_path)) == str(tmp_path.resolve())
    assert basemodels.locate("llama2-7b") == catalog.get_model("llama2-7b").hf_id
    assert basemodels.locate("someorg/some-llama") == "someorg/some-llama"


def test_a_killed_builds_temp_dir_is_cleaned_up(tmp_path):
    final = cache.checkpoint_dir("random", tmp_path)
    stale = tmp_path / f".build-{final.name}-dead"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    ensure_tiny_model("random", tmp_path)
    assert not stale.exists()


def test_pretraining_is_deterministic(tiny_random):
    from dataclasses import replace

    from llmplatform.tiny import pretrain

    recipe = replace(pretrain.RECIPE, lines=500, steps=3, batch=4)
    first = weights_digest(pretrain.pretrain(tiny_random, recipe))
    assert weights_digest(pretrain.pretrain(tiny_random, recipe)) == first
    assert first != json.loads((tiny_random / "tiny.json").read_text())["weights_sha256"]
