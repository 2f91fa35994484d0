"""Loading a Llama base model with LoRA (peft) or QLoRA (bitsandbytes 4-bit NF4) adapters.

`load_for_training` returns a `PeftModel` in train mode with only adapter (and `modules_to_save`)
parameters trainable. QLoRA on CPU has one trap (STACK-NOTES): bitsandbytes repacks 4-bit
weights for a fast CPU kernel the first time a `Linear4bit` runs a forward with
`module.training == False` and an input without grad, after which LoRA gradients that flow
through the base layer are silently wrong. `evaluation_mode` therefore puts the model in eval
mode (no dropout) but keeps every `Linear4bit` in training mode, so no forward ever repacks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from llmplatform.specs import FineTuneSpec

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for the resolved precision (bf16/fp16/fp32); None means plain fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def load_tokenizer(base_dir: str | Path):
    """The base model's tokenizer with a pad id (Llama 2 has none: use unk, else eos) and a chat template."""
    from transformers import AutoTokenizer

    from llmplatform.chat_template import ensure_chat_template

    tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(str(base_dir)))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def lora_config(spec: FineTuneSpec):
    from peft import LoraConfig

    targets = spec.lora.target_modules
    return LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules="all-linear" if "all-linear" in targets else list(targets),
        modules_to_save=list(spec.lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_base(spec: FineTuneSpec, base_dir: str | Path, device: torch.device, quantization: dict | None = None, precision: str = "bf16"):
    """The frozen base model: 16-bit on GPUs (the resolved precision), fp32 on CPU for LoRA; 4-bit
    NF4 (double quant) for QLoRA, with the resolved quantisation settings."""
    from transformers import AutoModelForCausalLM

    if spec.method == "qlora":
        from types import SimpleNamespace

        from transformers import BitsAndBytesConfig

        q = SimpleNamespace(**(quantization or spec.quantization.model_dump(mode="json")))
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype],
        )
        device_map = {"": (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else "cpu"}
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=bnb, device_map=device_map, dtype=_DTYPES[q.compute_dtype])
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32) if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device)
    model.config.use_cache = False
    return model


def load_for_training(spec: FineTuneSpec, base_dir: str | Path, device: torch.device, quantization: dict | None = None,
                      precision: str = "bf16"):
    """Base + fresh LoRA adapters, in train mode from the start (never an eval forward first)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_base(spec, base_dir, device, quantization, precision)
    checkpointing = spec.hyperparameters.gradient_checkpointing
    model.train()
    if spec.method == "qlora":
        # non-reentrant checkpointing, as for LoRA (torch warns on the implicit reentrant default, seen on the GPU run)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(spec))
    model.train()
    return model


def quantized_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The bitsandbytes 4-bit linear layers inside `model` (empty for plain LoRA)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def weights_repacked(model: torch.nn.Module) -> bool:
    """True if any 4-bit layer was repacked for CPU inference (LoRA grads would then be wrong)."""
    return any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False) for m in quantized_layers(model))


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """No dropout and no grad, safe for 4-bit layers; restores train mode afterwards."""
    model.eval()
    for layer in quantized_layers(model):
        layer.train()  # keeps bitsandbytes from repacking the weights (see module docstring)
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (adapters, modules_to_save) by name, on CPU: what a resume needs."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint has parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
