"""Optimizer settings come from the spec; the schedule warms up, then decays to min_lr_ratio."""

import math

import pytest
import torch

from llmplatform.specs import HyperParameters
from llmplatform.training import optimizer as optim


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    model[1].weight.requires_grad_(False)
    return model


def test_adamw_takes_betas_eps_and_decays_matrices_only():
    hp = HyperParameters(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-7, weight_decay=0.2)
    opt = optim.build_optimizer(_model(), hp)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-7 and decay["lr"] == 3e-4
    assert decay["weight_decay"] == 0.2 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and [p.ndim for p in no_decay["params"]] == [1, 1]  # bias, norm bias


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_step(name):
    import bitsandbytes as bnb

    model = torch.nn.Linear(64, 64)
    opt = optim.build_optimizer(model, HyperParameters(optimizer=name, learning_rate=1e-2))
    assert isinstance(opt, bnb.optim.optimizer.Optimizer8bit)
    before = model.weight.detach().clone()
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_cosine_schedule_warms_up_then_ends_at_min_ratio():
    hp = HyperParameters(learning_rate=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1, lr_scheduler="cosine")
    factors = [optim.lr_factor(s, 100, hp) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # 10 warmup steps
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay after warmup
    assert factors[100] == pytest.approx(0.1)
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduler_drives_the_optimizer_lr():
    hp = HyperParameters(learning_rate=1e-3, warmup_ratio=0.0, min_lr_ratio=0.0, lr_scheduler="linear")
    opt = optim.build_optimizer(_model(), hp)
    sched = optim.build_scheduler(opt, hp, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_constant_schedule_stays_at_peak_after_warmup():
    hp = HyperParameters(warmup_ratio=0.5, lr_scheduler="constant")
    assert [optim.lr_factor(s, 4, hp) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
