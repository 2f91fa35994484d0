"""Tiny real peft LoRA adapters on a tiny Llama config, for the registry's compatibility checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def build_adapter(out: Path, base_dir: Path, *, r: int = 8, targets=("q_proj", "v_proj"), modules_to_save=None, **shape) -> Path:
    """Save a real peft LoRA adapter for a tiny Llama (random init) and return its directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **shape}))
    model.name_or_path = str(base_dir)  # what peft writes as base_model_name_or_path
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A base checkpoint directory holding only the config (what compatibility reads)."""
    from transformers import LlamaConfig

    base = tmp_path_factory.mktemp("base")
    LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]).save_pretrained(base)
    assert json.loads((base / "config.json").read_text())["vocab_size"] == 1024
    return base


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_base) -> dict[str, Path]:
    """A fitting adapter and one per kind of misfit."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "good": build_adapter(root / "good", tiny_base, modules_to_save=["lm_head"]),
        "all_linear": build_adapter(root / "all", tiny_base, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj")),
        "vocab": build_adapter(root / "vocab", tiny_base, modules_to_save=["lm_head"], vocab_size=1000),
        "hidden": build_adapter(root / "hidden", tiny_base, hidden_size=128),
        "layers": build_adapter(root / "layers", tiny_base, num_hidden_layers=3),
    }
