"""FSDP (`llmplatform.training.sharding`) against DDP, in two gloo processes on this CPU, through
the loop's own functions: the same data gives the same losses, global grad norms and eval loss;
a checkpoint gathered from the shards resumes to exactly the step the run would have taken; and
its adapter loads with `PeftModel.from_pretrained` holding exactly the gathered tensors."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
STEPS_BEFORE_CHECKPOINT = 3


class _Dir:
    """What `loop.load_checkpoint` uses of a `ray.train.Checkpoint`."""

    def __init__(self, path: Path):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.path)


def _run(strategy: str, spec, base: str, rank: int, ckpt: Path) -> dict:
    """Steps, an eval, a checkpoint, one more step; then that step again from the checkpoint."""
    from torch.nn.parallel import DistributedDataParallel

    from llmplatform.resolve import resolve
    from llmplatform.training import batches, loop, model_setup, optimizer as optim, sharding

    def build():
        torch.manual_seed(spec.hyperparameters.seed)
        model = model_setup.load_for_training(spec, base, torch.device("cpu"))
        model = sharding.shard_model(model, torch.device("cpu"), WORLD) if strategy == "fsdp" else DistributedDataParallel(model)
        opt = optim.build_optimizer(model, spec.hyperparameters)
        return model, opt, optim.build_scheduler(opt, spec.hyperparameters, 10)

    tok = model_setup.load_tokenizer(base)
    train, val = batches.tokenized_examples(spec, tok, "train"), batches.tokenized_examples(spec, tok, "validation")
    model, opt, sched = build()
    ctx = dict(spec=spec, world=WORLD, rank=rank, device=torch.device("cpu"), pad_id=tok.pad_token_id, train=train, val=val[:9],
               shard=batches.Shard(len(train), WORLD, rank, spec.hyperparameters.micro_batch_size, 0), model=model, opt=opt, sched=sched,
               step=0, position=0, amp_dtype=model_setup.autocast_dtype(resolve(spec)["precision"]), sharded=sharding.is_sharded(model))
    steps = [loop.train_step(ctx) for _ in range(STEPS_BEFORE_CHECKPOINT)]
    evaluated = loop.evaluate(model, ctx["val"], ctx)  # 9 examples, micro-batch 4: rank 0 runs 2 batches, rank 1 one
    state = loop.checkpoint_state(model, opt, sched, ctx["step"], ctx["position"])
    if rank == 0:
        loop.save_checkpoint(ckpt, model, state, tok)
    torch.distributed.barrier()
    continued = loop.train_step(ctx)

    ctx["model"], ctx["opt"], ctx["sched"] = build()
    ctx["step"], ctx["position"] = loop.load_checkpoint(_Dir(ckpt), ctx["model"], ctx["opt"], ctx["sched"])
    resumed = loop.train_step(ctx)
    return {"steps": steps, "eval": evaluated, "continued": continued, "resumed": resumed, "resumed_at": ctx["step"] - 1}


def _worker(rank: int, port: int, specs: dict, base: str, out: str) -> None:
    import torch.distributed as dist

    from llmplatform.specs import FineTuneSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {}
        for method, spec_json in specs.items():
            spec = FineTuneSpec.model_validate(spec_json)
            result[method] = {s: _run(s, spec, base, rank, Path(out) / method / s) for s in ("ddp", "fsdp")}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_random_dir, task_files, tmp_path_factory) -> tuple[Path, list[dict]]:
    """(output dir, per-rank results) of LoRA and QLoRA, each under DDP and FSDP, in one pair of
    processes (starting them costs more than the steps)."""
    from llmplatform.specs import parse_spec
    from llmplatform.stack.ports import free_port

    out = tmp_path_factory.mktemp("sharding")
    specs = {method: parse_spec("finetune", {
        "name": "unit", "base_model": str(tiny_random_dir), "method": method,
        "data": {"train": str(task_files["train"]), "validation": str(task_files["eval"]), "max_seq_length": 64},
        "lora": {"dropout": 0.0, "modules_to_save": ["lm_head", "embed_tokens"]},
        "hyperparameters": {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "max_grad_norm": 0.5},
        "resources": {"workers": WORLD, "strategy": "fsdp"},
    }).model_dump(mode="json") for method in ("lora", "qlora")}
    mp.spawn(_worker, args=(free_port(), specs, str(tiny_random_dir), str(out)), nprocs=WORLD)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp_matches_ddp_step_for_step(method, runs):
    _, ranks = runs
    ddp, fsdp = ranks[0][method]["ddp"], ranks[0][method]["fsdp"]
    # qlora: bf16 autocast, whose sums run in another order under FSDP; measured (2026-12-05): losses
    # within 7e-4, grad norms within 1.3e-2 (the norm adds up every bf16 gradient's rounding)
    tol = 1e-4 if method == "lora" else 1e-2
    grad_tol = 1e-4 if method == "lora" else 3e-2
    for a, b in zip(ddp["steps"] + [ddp["continued"]], fsdp["steps"] + [fsdp["continued"]]):
        assert b["loss"] == pytest.approx(a["loss"], rel=tol) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=grad_tol)
    assert fsdp["steps"][0]["grad_norm"] > 0.5  # above max_grad_norm: clipping was in play
    assert fsdp["eval"]["eval_loss"] == pytest.approx(ddp["eval"]["eval_loss"], rel=tol)
    assert [s["grad_norm"] for s in ranks[1][method]["fsdp"]["steps"]] == [s["grad_norm"] for s in fsdp["steps"]]  # global, not per shard


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_gathered_fsdp_checkpoint_resumes_exactly_and_exports_a_peft_adapter(method, runs, tiny_random_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, ranks = runs
    for run in ranks[0][method].values():  # ddp and fsdp
        assert run["resumed_at"] == STEPS_BEFORE_CHECKPOINT
        assert run["resumed"]["loss"] == pytest.approx(run["continued"]["loss"], rel=1e-6)
        assert run["resumed"]["grad_norm"] == pytest.approx(run["continued"]["grad_norm"], rel=1e-5)

    ckpt = out / method / "fsdp"
    gathered = torch.load(ckpt / "training_state.pt", weights_only=False)["trainable"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_random_dir), dtype=torch.float32)
    params = dict(PeftModel.from_pretrained(base, str(ckpt / "adapter")).named_parameters())
    assert len(gathered) == 58 and all(torch.equal(params[n], t) for n, t in gathered.items())
    assert all(float(t.abs().max()) > 0 for n, t in gathered.items() if "lora_B" in n)  # trained away from zero init


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"])
def test_fsdp_with_a_bitsandbytes_optimizer_is_refused_with_the_fix(optimizer, spec_for):
    from llmplatform.errors import SpecError

    with pytest.raises(SpecError) as err:
        spec_for(method="qlora", hyperparameters={"optimizer": optimizer}, resources={"workers": 2, "strategy": "fsdp"})
    message = str(err.value)
    assert f"hyperparameters.optimizer '{optimizer}'" in message and "set hyperparameters.optimizer: adamw" in message
    assert spec_for(hyperparameters={"optimizer": optimizer}, resources={"workers": 2, "strategy": "ddp"})  # DDP is fine
    assert spec_for(method="qlora", resources={"workers": 2, "strategy": "fsdp"})  # and FSDP with adamw


def test_auto_strategy_shards_only_what_the_planner_says_one_gpu_cannot_hold(spec_for):
    from llmplatform.resolve import resolve

    def resolve_strategy(spec):
        return resolve(spec).require()["strategy"]

    gpu = {"workers": 2, "gpus_per_worker": 1, "gpu_type": "a100-40gb"}
    assert resolve_strategy(spec_for(base_model="llama2-70b", resources=gpu)) == "fsdp"  # 70B LoRA: ~140 GB of bf16 weights
    assert resolve_strategy(spec_for(base_model="llama2-7b", method="qlora", resources=gpu)) == "ddp"  # 7B QLoRA fits one GPU
    assert resolve_strategy(spec_for(base_model="llama2-7b", method="qlora", resources={**gpu, "strategy": "fsdp"})) == "fsdp"  # explicit wins
    [too_big] = resolve(spec_for(base_model="llama2-70b", resources={**gpu, "strategy": "ddp"})).problems  # ... unless it cannot fit
    assert too_big.location == "resources.strategy" and "FSDP over 8 GPUs" in too_big.message
    assert resolve_strategy(spec_for(base_model="llama2-70b", resources={"workers": 2})) == "ddp"  # no GPU type: nothing to plan with
    assert resolve_strategy(spec_for(resources=gpu)) == "ddp"  # a local directory has no catalog shape
    paged = spec_for(base_model="llama2-70b", hyperparameters={"optimizer": "paged_adamw_8bit"}, resources=gpu)
    # bitsandbytes optimizers can't step sharded parameters, and DDP would not fit: refused, naming the fix
    [problem] = resolve(paged).problems
    assert problem.location == "hyperparameters.optimizer" and "adamw" in problem.accepted
