"""Fold a LoRA adapter into its base model: W + (alpha / r) * B @ A for every adapted layer (peft's
`merge_and_unload`), leaving a plain transformers model."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def merged_model(base_dir: str | Path, adapter_dir: str | Path, dtype: str = "auto"):
    """The merged model on the CPU. The merge runs in float32 (so the low-rank update is not rounded
    twice) and the result is cast to `dtype`: `auto` keeps the base checkpoint's own dtype."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target = DTYPES[dtype] if dtype != "auto" else _config_dtype(AutoConfig.from_pretrained(str(base_dir)))
    return model.to(target).eval()


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return value if isinstance(value, torch.dtype) else DTYPES.get(str(value).removeprefix("torch."), torch.float32)


def save_merged(model, tokenizer_dir: str | Path, out: Path) -> list[str]:
    """Write the merged checkpoint (safetensors) and the base's tokenizer files into `out`; returns
    the file names written."""
    model.save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer(Path(tokenizer_dir), out)
    return sorted(p.name for p in out.iterdir() if p.is_file())


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())
