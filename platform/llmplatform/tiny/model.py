"""The `llama2-tiny` network: a Llama 2 architecture small enough to train on one CPU core.

The shape comes from the catalog entry `llama2-tiny` (vocab 1024, hidden 256, FFN 768,
4 layers, 4 heads, 2 KV heads, context 1024: every dim a multiple of 64 so bitsandbytes'
4-bit kernels accept it). `random_model()` builds it from a fixed seed, so two builds give
identical weights; `save_checkpoint()` writes a plain HF checkpoint directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

NAME = "llama2-tiny"
SEED = 0

def shape() -> dict:
    """The tiny model's catalog entry as a dict (vocab, hidden, ffn, layers, heads, ...)."""
    from dataclasses import asdict

    from llmplatform import catalog

    return asdict(catalog.get_model(NAME))


def hf_config_dict() -> dict:
    """`LlamaConfig` keyword arguments: the catalog's, stored in float32."""
    from llmplatform import catalog

    return {**catalog.to_hf_config(NAME), "dtype": "float32"}


def hf_config():
    """A transformers `LlamaConfig` for the tiny shape with Llama 2's defaults."""
    from transformers import LlamaConfig

    return LlamaConfig(**hf_config_dict())


def random_model(seed: int = SEED):
    """LlamaForCausalLM with seeded random init (identical weights on every call)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config())
    model.generation_config.pad_token_id = None
    return model.eval()


def weights_digest(model) -> str:
    """sha256 over every parameter tensor, in name order: equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(model, out_dir: Path) -> Path:
    """Write config.json, generation_config.json and model.safetensors into `out_dir`."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
