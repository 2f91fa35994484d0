"""AdamW (plain, paged or 8-bit) and the learning-rate schedule: linear warmup, then cosine
(or linear) decay to `min_lr_ratio` of the peak, or constant.

Weight decay applies to matrices only (LoRA A/B, saved modules), not to biases or norms.
Paged optimizers come from bitsandbytes; on a CPU bitsandbytes falls back to plain paging-free
state with a warning, which is what the tests run.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from llmplatform.specs import HyperParameters


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, hp: HyperParameters) -> torch.optim.Optimizer:
    """The spec's optimizer over the trainable parameters of `model`."""
    groups = param_groups(model.named_parameters(), hp.weight_decay)
    kwargs = dict(lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_epsilon)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[hp.optimizer]
    return cls(groups, **kwargs)


def warmup_steps(hp: HyperParameters, total_steps: int) -> int:
    return int(math.ceil(hp.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, hp: HyperParameters) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    warm = warmup_steps(hp, total_steps)
    if step < warm:
        return (step + 1) / warm
    if hp.lr_scheduler == "constant":
        return 1.0
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    floor = hp.min_lr_ratio
    if hp.lr_scheduler == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, hp: HyperParameters, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, hp))
