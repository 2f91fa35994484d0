"""Adapter/base compatibility: real peft adapters checked against a tiny Llama base config."""

from __future__ import annotations

import json
import shutil

from llmplatform.registry import check_compatibility, compatibility_facts


def test_fitting_adapters_have_no_problems(adapters, tiny_base):
    assert check_compatibility(adapters["good"], tiny_base) == []
    assert check_compatibility(adapters["all_linear"], tiny_base, base_model=str(tiny_base)) == []


def test_vocab_mismatch_is_named_with_both_sizes(adapters, tiny_base):
    problems = check_compatibility(adapters["vocab"], tiny_base)
    assert any("vocab" in p and "1000" in p and "1024" in p for p in problems), problems


def test_hidden_size_and_layer_count_mismatches(adapters, tiny_base):
    hidden = check_compatibility(adapters["hidden"], tiny_base)
    assert any("q_proj.lora_A" in p and "128" in p and "64" in p for p in hidden), hidden
    layers = check_compatibility(adapters["layers"], tiny_base)
    assert any("layer 2" in p and "num_hidden_layers=2" in p for p in layers), layers


def test_rank_in_config_disagreeing_with_weights(adapters, tiny_base, tmp_path):
    bad = shutil.copytree(adapters["good"], tmp_path / "rank")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 16
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    problems = check_compatibility(bad, tiny_base)
    assert any("rank 8" in p and "r=16" in p for p in problems), problems


def test_target_modules_unknown_to_the_architecture(adapters, tiny_base, tmp_path):
    bad = shutil.copytree(adapters["good"], tmp_path / "targets")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]  # GPT-2 naming
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    problems = check_compatibility(bad, tiny_base)
    assert any("c_attn" in p and "target_modules" in p for p in problems), problems
    assert any("v_proj" in p and "not in" in p for p in problems), problems  # weights hold v_proj, config doesn't


def test_base_model_id_mismatch(adapters, tiny_base):
    problems = check_compatibility(adapters["good"], tiny_base, base_model="meta-llama/Llama-2-7b-hf")
    assert any("base_model_name_or_path" in p and "Llama-2-7b-hf" in p for p in problems), problems


def test_other_architecture_is_refused(adapters, tiny_base):
    cfg = json.loads((tiny_base / "config.json").read_text())
    problems = check_compatibility(adapters["good"], {**cfg, "model_type": "gpt2"})
    assert any("gpt2" in p for p in problems), problems


def test_missing_files_are_reported(tmp_path, tiny_base):
    assert "adapter_config.json" in check_compatibility(tmp_path, tiny_base)[0]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
    assert any("no adapter weights" in p for p in check_compatibility(tmp_path, tiny_base))


def test_facts_record_rank_targets_and_base_shape(adapters, tiny_base):
    facts = compatibility_facts(adapters["good"], tiny_base)
    assert (facts["r"], facts["lora_alpha"], facts["target_modules"]) == (8, 16, ["q_proj", "v_proj"])
    assert (facts["vocab_size"], facts["hidden_size"], facts["modules_to_save"]) == (1024, 64, ["lm_head"])
    other = compatibility_facts(adapters["good"], {**json.loads((tiny_base / "config.json").read_text()), "vocab_size": 7})
    assert other["base_config_sha256"] != facts["base_config_sha256"]


def test_catalog_name_and_hf_id_are_the_same_base(adapters, tiny_base, tmp_path):
    hub = shutil.copytree(adapters["good"], tmp_path / "hub")
    cfg = json.loads((hub / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (hub / "adapter_config.json").write_text(json.dumps(cfg))
    assert check_compatibility(hub, tiny_base, base_model="llama2-7b") == []
    assert any("base_model_name_or_path" in p for p in check_compatibility(hub, tiny_base, base_model="llama2-13b"))
