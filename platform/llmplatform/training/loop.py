"""The per-worker training function run by Ray Train's `TorchTrainer`.

One optimizer step = `gradient_accumulation_steps` micro-batches per worker; DDP (gloo on CPU,
NCCL on GPU) averages gradients; with `resources.strategy: fsdp` and several workers the model
is sharded instead (`sharding`: FSDP2 on gloo or NCCL). Every `eval.every_n_steps` steps the
validation set gives loss, perplexity and token accuracy; every `checkpoint.every_n_steps` steps
(and at the end) rank 0 reports a checkpoint holding the adapter (peft format), the trainable
tensors, optimizer, scheduler, RNG, step and data position (gathered in full from the shards
under FSDP). On start the loop resumes from `ray.train.get_checkpoint()`, so a restarted
worker group continues the step count.
Rank 0 logs per-step metrics to MLflow and prints one `PLATFORM_PROGRESS {json}` line per step,
which the job backends read from the Ray job logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch

from llmplatform import cpus
from llmplatform.resolve import Resolved
from llmplatform.specs import FineTuneSpec
from llmplatform.training import batches, model_setup, optimizer as optim, sharding

PROGRESS_PREFIX = "PLATFORM_PROGRESS "
STATE_FILE = "training_state.pt"


def emit(kind: str, progress_file: str | None = None, **fields) -> None:
    """One machine-readable line in the job log (`PLATFORM_PROGRESS {...}`), and in `progress_file` if given."""
    line = json.dumps({"kind": kind, **fields})
    print(PROGRESS_PREFIX + line, flush=True)
    if progress_file:
        with open(progress_file, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def total_steps(spec: FineTuneSpec, per_epoch: int) -> int:
    hp = spec.hyperparameters
    if hp.max_steps:
        return hp.max_steps
    return max(1, math.ceil(hp.epochs * per_epoch / hp.gradient_accumulation_steps))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of token losses, correct next tokens, trained tokens) for labels != -100.

    logits: [B, S, V]; labels: [B, S] (position t predicts labels[t + 1]).
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
    correct = ((logits.argmax(-1) == target) & mask).sum()
    return loss, correct, mask.sum()


def forward(model, batch: dict[str, torch.Tensor], amp_dtype, device_type: str) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ctx = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with ctx:
        return model(**inputs).logits


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def evaluate(model, examples, ctx: dict) -> dict[str, float]:
    """Validation loss, perplexity and next-token accuracy on trained (label != -100) tokens."""
    if not examples:
        return {}
    loss_sum = correct = count = 0.0
    spec: FineTuneSpec = ctx["spec"]
    mb, cap = spec.hyperparameters.micro_batch_size, spec.eval.max_batches
    mine = batches.eval_batches(len(examples), ctx["world"], ctx["rank"], mb, cap)
    rounds = len(mine)
    if ctx.get("sharded"):  # each forward gathers weights with every rank: run as many as the busiest rank
        rounds = max(len(batches.eval_batches(len(examples), ctx["world"], r, mb, cap)) for r in range(ctx["world"]))
    with model_setup.evaluation_mode(model):
        for i in range(rounds):
            idx = mine[i] if i < len(mine) else (mine[:1] or [[0]])[0]  # past its own batches: a forward to discard
            batch = batches.make_batch(examples, idx, ctx["pad_id"], ctx["device"])
            logits = forward(model, batch, ctx["amp_dtype"], ctx["device"].type)
            if i >= len(mine):
                continue
            l, c, n = token_loss(logits, batch["labels"])
            loss_sum, correct, count = loss_sum + float(l), correct + float(c), count + float(n)
    loss_sum, correct, count = _all_reduce([loss_sum, correct, count])
    loss = loss_sum / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 30.0)), "eval_token_accuracy": correct / max(count, 1.0)}


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def checkpoint_state(model, opt, sched, step: int, position: int) -> dict:
    """Everything a resume needs. A sharded model is gathered in full (trainable tensors and
    optimizer state, keyed by parameter name): a collective, so every rank calls this and only
    rank 0's result is complete."""
    sharded = sharding.is_sharded(model)
    if sharded:
        trainable, optimizer = sharding.full_state(model, opt)
    else:
        trainable, optimizer = model_setup.trainable_state(unwrap(model)), opt.state_dict()
    return {"trainable": trainable, "optimizer": optimizer, "scheduler": sched.state_dict(), "step": step,
            "data_position": position, "torch_rng": torch.get_rng_state(), "sharded": sharded}


def save_checkpoint(path: Path, model, state: dict, tokenizer=None) -> None:
    """Adapter in peft format + `state` (from `checkpoint_state`), into directory `path`."""
    inner = unwrap(model)
    if state.get("sharded"):  # the model's own tensors are shards: save the gathered ones
        inner.save_pretrained(str(path / "adapter"), state_dict=state["trainable"])
    else:
        inner.save_pretrained(str(path / "adapter"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path / "tokenizer"))
    torch.save(state, path / STATE_FILE)


def read_state(path: Path) -> dict:
    """A `checkpoint_state` file, unpickled with `weights_only=True`: tensors, containers and plain
    values only, so a checkpoint on shared storage can never run code when a job resumes from it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RuntimeError(f"{path} holds more than tensors and plain values, so it is not loaded "
                           f"(a checkpoint must never run code): {str(exc).splitlines()[0]}") from exc


def load_checkpoint(checkpoint, model, opt, sched) -> tuple[int, int]:
    """Restore from a Ray checkpoint (a collective for a sharded model); returns (step, data_position)."""
    with checkpoint.as_directory() as d:
        state = read_state(Path(d) / STATE_FILE)
    if state.get("sharded", False) != sharding.is_sharded(model):
        raise RuntimeError("the checkpoint was written with another resources.strategy (fsdp vs ddp); resume with the same spec")
    if state.get("sharded"):
        sharding.load_state(model, opt, state["trainable"], state["optimizer"])
    else:
        model_setup.load_trainable_state(unwrap(model), state["trainable"])
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), int(state["data_position"])


def setup(config: dict) -> dict:
    """Everything a worker needs before the first step: model, data, optimizer, resume point."""
    import ray.train
    import ray.train.torch

    plan = Resolved.from_dict(config["plan"], "training plan")  # every derived value; nothing is planned here
    spec = plan.spec
    hp = spec.hyperparameters
    cpus.use_all_cpus()  # a partitioned local stack starts Ray workers on its front-end CPUs only
    torch.set_num_threads(int(config.get("torch_threads") or 1))
    torch.manual_seed(hp.seed)
    tctx = ray.train.get_context()
    world, rank = tctx.get_world_size(), tctx.get_world_rank()
    device = ray.train.torch.get_device() if plan["use_gpu"] else torch.device("cpu")

    tokenizer = model_setup.load_tokenizer(config["base_dir"])
    if plan["objective"] == "dpo":  # preference pairs; the steps are dpo.train_step / dpo.evaluate
        from llmplatform.training import dpo

        train, val = dpo.tokenized_pairs(spec, tokenizer, "train"), dpo.tokenized_pairs(spec, tokenizer, "validation")
    else:
        train = batches.tokenized_examples(spec, tokenizer, "train")
        val = batches.tokenized_examples(spec, tokenizer, "validation")
    shard = batches.Shard(len(train), world, rank, hp.micro_batch_size, hp.seed)
    if shard.per_epoch < 1:
        raise ValueError(f"{len(train)} training sequences are too few for {world} worker(s) x micro_batch_size {hp.micro_batch_size}")
    steps = total_steps(spec, shard.per_epoch)

    model = model_setup.load_for_training(spec, config["base_dir"], device, plan["quantization"], plan["precision"])
    if world > 1 and plan["strategy"] == "fsdp":  # Ray's prepare_model refuses FSDP on CPU (see sharding)
        model = sharding.shard_model(model, device, world)
    elif world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")
    opt = optim.build_optimizer(model, hp)
    sched = optim.build_scheduler(opt, hp, steps)
    step = position = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        step, position = load_checkpoint(checkpoint, model, opt, sched)
    return dict(
        spec=spec, plan=plan, world=world, rank=rank, device=device, tokenizer=tokenizer, pad_id=tokenizer.pad_token_id,
        train=train, val=val, shard=shard, steps=steps, model=model, opt=opt, sched=sched,
        step=step, position=position, resumed=checkpoint is not None, progress_file=config.get("progress_file"),
        amp_dtype=model_setup.autocast_dtype(plan["precision"]), logger=config.get("logger"), sharded=sharding.is_sharded(model),
    )


def no_sync(model, sharded: bool):
    """Accumulate gradients locally (no all-reduce / reduce-scatter) for a non-final micro-batch."""
    if sharded:
        return sharding.no_gradient_sync(model)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def train_step(ctx: dict) -> dict[str, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches."""
    spec, model = ctx["spec"], ctx["model"]
    accum = spec.hyperparameters.gradient_accumulation_steps
    loss_sum = tokens_trained = tokens_seen = 0.0
    for micro in range(accum):
        batch = batches.make_batch(ctx["train"], ctx["shard"].indices(ctx["position"]), ctx["pad_id"], ctx["device"])
        ctx["position"] += 1
        with contextlib.nullcontext() if micro == accum - 1 else no_sync(model, ctx.get("sharded", False)):
            logits = forward(model, batch, ctx["amp_dtype"], ctx["device"].type)
            l, _, n = token_loss(logits, batch["labels"])
            (l / n.clamp(min=1) / accum).backward()
        loss_sum, tokens_trained = loss_sum + float(l.detach()), tokens_trained + float(n)
        tokens_seen += batches.count_tokens(batch, ctx["pad_id"])
    grad_norm, lr = apply_step(ctx)
    return {"loss": loss_sum / max(tokens_trained, 1.0), "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen * ctx["world"]}


def apply_step(ctx: dict) -> tuple[float, float]:
    """After a step's backward passes (SFT or DPO): clip, step the optimizer and the schedule, zero the
    grads, count the step; (global grad norm before clipping, the lr the step used)."""
    trainable = [p for p in ctx["model"].parameters() if p.requires_grad]
    # sharded grads are DTensors: clip_grad_norm_ computes the global norm, returned as a DTensor
    grad_norm = sharding.full_tensor(torch.nn.utils.clip_grad_norm_(trainable, ctx["spec"].hyperparameters.max_grad_norm))
    opt = ctx["opt"]
    lr = opt.param_groups[0]["lr"]
    opt.step()
    ctx["sched"].step()
    opt.zero_grad(set_to_none=True)
    ctx["step"] += 1
    return float(grad_norm), lr


def report(ctx: dict, metrics: dict, with_checkpoint: bool) -> None:
    """ray.train.report from every rank; rank 0 attaches the checkpoint."""
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    state = None
    if ctx["rank"] == 0 or ctx.get("sharded"):  # sharded: every rank takes part in gathering the state
        state = checkpoint_state(ctx["model"], ctx["opt"], ctx["sched"], ctx["step"], ctx["position"])
    with tempfile.TemporaryDirectory(prefix="ckpt") as tmp:
        if ctx["rank"] == 0:
            save_checkpoint(Path(tmp), ctx["model"], state, ctx["tokenizer"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            emit("checkpoint", ctx["progress_file"], step=ctx["step"])
        else:
            ray.train.report(metrics)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: set up, (resume,) train to `total_steps`, eval and checkpoint on cadence."""
    from llmplatform.training.mlflow_logging import StepLogger
    from llmplatform.training.resource_usage import NAMES, ResourceMeter

    entered = time.perf_counter()  # the workers hold their devices from here (model loading included)
    ctx = setup(config)
    plan = ctx["plan"]
    rank0 = ctx["rank"] == 0
    logger = StepLogger(config["tracking_uri"], config["run_id"]) if rank0 and config.get("run_id") else None
    meter = ResourceMeter(plan["workers"], plan["gpus_per_worker"], plan["cpus_per_worker"],
                          logger.latest(NAMES) if logger and ctx["resumed"] else None, started=entered)
    emit("worker_start", ctx["progress_file"], rank=ctx["rank"], pid=os.getpid(), step=ctx["step"], total=ctx["steps"], resumed=ctx["resumed"])
    step_fn, eval_fn = train_step, evaluate
    if plan["objective"] == "dpo":
        from llmplatform.training import dpo

        step_fn, eval_fn = dpo.train_step, dpo.evaluate
    last_eval: dict[str, float] = {}
    started, start_step = time.perf_counter(), ctx["step"]
    while ctx["step"] < ctx["steps"]:
        t0 = time.perf_counter()
        metrics = step_fn(ctx)
        meter.add_tokens(metrics["tokens"])
        metrics["tokens_per_s"] = metrics.pop("tokens") / max(time.perf_counter() - t0, 1e-9)
        metrics.update(meter.metrics())  # cumulative gpu_hours, cpu_core_hours, trained_tokens
        step = ctx["step"]
        final = step == ctx["steps"]
        ckpt_due = final or step % plan["checkpoint_every_n_steps"] == 0
        evaluated = final or (plan["eval_every_n_steps"] and step % plan["eval_every_n_steps"] == 0) or (ckpt_due and ctx["val"])
        if evaluated:
            last_eval = eval_fn(ctx["model"], ctx["val"], ctx)
            metrics.update(last_eval)
        if rank0:
            if logger:
                logger.log(metrics, step)
            elapsed = time.perf_counter() - started
            emit("step", ctx["progress_file"], step=step, total=ctx["steps"], start_step=start_step, elapsed_s=round(elapsed, 2), **{k: round(v, 6) for k, v in metrics.items()})
        if ckpt_due:
            if logger:
                logger.flush()  # metrics up to a checkpoint are never lost to a crash after it
            report(ctx, {"step": step, "total_steps": ctx["steps"], "loss": metrics["loss"], **last_eval}, with_checkpoint=True)
        elif evaluated and last_eval:  # eval metrics between checkpoints: what a sweep's early stopping (ASHA) ranks by
            report(ctx, {"step": step, "total_steps": ctx["steps"], "loss": metrics["loss"], **last_eval}, with_checkpoint=False)
    if logger:
        logger.flush()
