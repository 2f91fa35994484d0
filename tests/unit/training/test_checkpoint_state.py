"""Checkpoint state (`training_state.pt`) loads with `torch.load(weights_only=True)`: a resume
restores optimizer, scheduler, RNG, step and data position for every optimizer the spec offers,
and a state file carrying a pickled object is refused without running it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmplatform.training import loop, model_setup, optimizer as optim


def _Dir(path: Path):
    """A real `ray.train.Checkpoint` over a local directory (what `loop.load_checkpoint` is given)."""
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(path))


class _RunsCode:
    """Unpickling this creates `marker`: the code execution a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _train(spec, base, steps: int):
    torch.manual_seed(spec.hyperparameters.seed)
    model = model_setup.load_for_training(spec, base, torch.device("cpu"))
    opt = optim.build_optimizer(model, spec.hyperparameters)
    sched = optim.build_scheduler(opt, spec.hyperparameters, 10)
    for _ in range(steps):
        ids = torch.randint(3, 200, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_a_checkpoint_resumes_with_weights_only_loading(optimizer, spec_for, tiny_random_dir, tmp_path):
    spec = spec_for(hyperparameters={"optimizer": optimizer, "learning_rate": 1e-3})
    model, opt, sched = _train(spec, tiny_random_dir, 2)
    torch.manual_seed(123)
    loop.save_checkpoint(tmp_path, model, loop.checkpoint_state(model, opt, sched, step=2, position=7))
    expected_rng = torch.get_rng_state()

    state = torch.load(tmp_path / loop.STATE_FILE, weights_only=True)  # what a resume reads
    assert state["step"] == 2 and state["data_position"] == 7

    torch.manual_seed(0)
    fresh, fresh_opt, fresh_sched = _train(spec, tiny_random_dir, 0)
    assert loop.load_checkpoint(_Dir(tmp_path), fresh, fresh_opt, fresh_sched) == (2, 7)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert fresh_sched.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 2
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for name, value in model_setup.trainable_state(model).items():
        assert torch.equal(model_setup.trainable_state(fresh)[name], value), name
    saved = opt.state_dict()["state"]
    for key, entry in fresh_opt.state_dict()["state"].items():
        for field, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, saved[key][field]), (key, field)


def test_a_state_file_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "data_position": 0, "sharded": False, "payload": _RunsCode(marker)}, tmp_path / loop.STATE_FILE)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(RuntimeError, match="never run code"):
        loop.load_checkpoint(_Dir(tmp_path), model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert not marker.exists()
