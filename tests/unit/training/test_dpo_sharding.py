"""DPO under DDP and FSDP (`sharding`), in two gloo processes on this CPU, through the DPO steps the
loop runs: the same pairs give the same losses, global grad norms, reward metrics and held-out
preference metrics, so a sharded model's reference forward (adapter disabled) is the same base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3


def _run(strategy: str, spec, base: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from llmplatform.resolve import resolve
    from llmplatform.training import batches, dpo, model_setup, optimizer as optim, sharding

    torch.manual_seed(spec.hyperparameters.seed)
    model = model_setup.load_for_training(spec, base, torch.device("cpu"))
    model = sharding.shard_model(model, torch.device("cpu"), WORLD) if strategy == "fsdp" else DistributedDataParallel(model)
    opt = optim.build_optimizer(model, spec.hyperparameters)
    tok = model_setup.load_tokenizer(base)
    train, val = dpo.tokenized_pairs(spec, tok, "train"), dpo.tokenized_pairs(spec, tok, "validation")
    ctx = dict(spec=spec, world=WORLD, rank=rank, device=torch.device("cpu"), pad_id=tok.pad_token_id, train=train, val=val[:9],
               shard=batches.Shard(len(train), WORLD, rank, spec.hyperparameters.micro_batch_size, 0), model=model, opt=opt,
               sched=optim.build_scheduler(opt, spec.hyperparameters, 10), step=0, position=0,
               amp_dtype=model_setup.autocast_dtype(resolve(spec)["precision"]), sharded=sharding.is_sharded(model))
    steps = [dpo.train_step(ctx) for _ in range(STEPS)]
    return {"steps": steps, "eval": dpo.evaluate(model, ctx["val"], ctx)}


def _worker(rank: int, port: int, specs: dict, base: str, out: str) -> None:
    import torch.distributed as dist

    from llmplatform.specs import FineTuneSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {m: {s: _run(s, FineTuneSpec.model_validate(j), base, rank) for s in ("ddp", "fsdp")} for m, j in specs.items()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_random_dir, tmp_path_factory) -> list[dict]:
    from llmplatform.specs import parse_spec
    from llmplatform.stack.ports import free_port
    from llmplatform.tiny.preference import write_preference_task

    out = tmp_path_factory.mktemp("dpo-sharding")
    data = write_preference_task(out / "data", n_train=48, n_eval=16)
    specs = {method: parse_spec("finetune", {
        "name": "unit", "base_model": str(tiny_random_dir), "method": method, "objective": "dpo",
        "data": {"train": str(data["train"]), "validation": str(data["eval"]), "max_seq_length": 64},
        "lora": {"dropout": 0.0}, "dpo": {"beta": 0.5},
        "hyperparameters": {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "max_grad_norm": 0.5},
        "resources": {"workers": WORLD, "strategy": "fsdp"},
    }).model_dump(mode="json") for method in ("lora", "qlora")}
    mp.spawn(_worker, args=(free_port(), specs, str(tiny_random_dir), str(out)), nprocs=WORLD)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_under_fsdp_matches_ddp_step_for_step(method, runs):
    ddp, fsdp = runs[0][method]["ddp"], runs[0][method]["fsdp"]
    tol = 1e-4 if method == "lora" else 2e-2  # qlora: bf16 autocast
    for a, b in zip(ddp["steps"], fsdp["steps"]):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=tol, abs=1e-4), key
    assert ddp["steps"][0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    assert ddp["steps"][-1]["rewards/margins"] > 0  # later steps: the policy moved toward the chosen answers
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert fsdp["eval"][key] == pytest.approx(ddp["eval"][key], rel=tol, abs=1e-4), key
    other = [{k: v for k, v in s.items() if k != "tokens"} for s in runs[1][method]["fsdp"]["steps"]]  # tokens: per rank x world
    assert other == [{k: v for k, v in s.items() if k != "tokens"} for s in fsdp["steps"]]  # reduced over ranks: every rank reports the same
