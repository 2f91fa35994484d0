"""`platformctl plan`: GPU memory breakdown and Ray placement for a model, method and GPU.

Parses flags, calls `planner.plan_training` or `planner.plan_serving`, and prints the result as
a table for people or JSON for scripts. A plan that does not fit still prints, and exits 1.
"""

from __future__ import annotations

import json

import typer

from llmplatform import planner
from llmplatform.catalog import get_model
from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit_json, render_table
from llmplatform.gpus import get_gpu

TRAIN_ROWS = {
    "weights": "base model weights",
    "adapter": "trainable adapter weights",
    "gradients": "gradients of trainable params",
    "optimizer": "AdamW states (m, v; + fp32 master for full)",
    "activations": "saved for backward (one micro-batch)",
    "overhead": "CUDA context, workspaces, allocator slack",
}
SERVE_ROWS = {
    "weights": "model weights (all shards)",
    "kv_cache": "KV cache for one max_model_len sequence",
    "activations": "forward workspace of one prefill chunk",
    "overhead": "CUDA context, workspaces (per GPU x tp)",
}


def plan(
    model: str = typer.Option(..., "--model", "-m", help="Catalog model: llama2-7b, llama2-13b, llama2-34b, llama2-70b, -chat variants, llama2-tiny, ..."),
    gpu: str = typer.Option(..., "--gpu", "-g", help="GPU type: a100-40gb, a100-80gb, h100-80gb, h200-141gb, l4-24gb, a10g-24gb, rtx4090-24gb, a6000-48gb, t4-16gb."),
    method: str = typer.Option(None, "--method", help="Fine-tuning method: lora, qlora or full (default qlora). Not with --serve."),
    serve: bool = typer.Option(False, "--serve", help="Plan inference (tensor parallelism, KV cache) instead of fine-tuning."),
    seq_len: int = typer.Option(None, "--seq-len", min=1, help="Training tokens per sequence (default 2048, or the context if shorter)."),
    micro_batch: int = typer.Option(None, "--micro-batch", min=1, help="Training sequences per GPU per step (default 1)."),
    lora_rank: int = typer.Option(None, "--lora-rank", min=1, help="LoRA rank r for lora/qlora (default 16)."),
    checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward (training)."),
    dtype: str = typer.Option(None, "--dtype", help="Serving weights dtype: auto, bfloat16, float16, float32, int8, nf4 (default auto)."),
    max_model_len: int = typer.Option(None, "--max-model-len", min=1, help="Serving: prompt + output tokens per request (default: the model's context)."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype", help="Serving KV cache dtype: auto (= compute dtype) or fp8."),
    gpus_per_node: int = typer.Option(None, "--gpus-per-node", min=1, help="GPUs in one node (default: the GPU type's usual 8)."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Memory breakdown (weights, adapters, optimizer, activations, KV cache) and Ray placement."""
    shape, device = get_model(model), get_gpu(gpu, gpus_per_node)
    if serve:
        if method is not None or seq_len is not None or micro_batch is not None or lora_rank is not None:
            raise planner.PlanError("--method, --seq-len, --micro-batch and --lora-rank are for fine-tuning plans; drop them, or drop --serve")
        result = planner.plan_serving(shape, device, dtype or "auto", max_model_len, kv_cache_dtype)
    else:
        if dtype is not None or max_model_len is not None:
            raise planner.PlanError("--dtype and --max-model-len are for serving plans; add --serve, or drop them")
        result = planner.plan_training(shape, method or "qlora", device, seq_len, micro_batch or 1, lora_rank or 16, checkpointing)
    if output == OutputFormat.json:
        emit_json(result.to_dict())
    else:
        typer.echo(render_plan(result))
    if not result.fits:
        raise typer.Exit(1)


def _params(model: str) -> str:
    count = get_model(model).params
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def render_plan(result: planner.TrainingPlan | planner.ServingPlan) -> str:
    """The plan as text: header, memory table, KV cache, placement, verdict, notes."""
    serving = isinstance(result, planner.ServingPlan)
    if serving:
        head = [f"{result.model} ({_params(result.model)} params) · serving · {result.gpu} ({result.gpu_memory_gib:g} GiB)",
                f"dtype {result.dtype} · kv cache {result.kv_cache_dtype} · max_model_len {result.max_model_len}"]
        rows, share = SERVE_ROWS, f"{planner.SERVE_MEMORY_FRACTION:.0%}"
    else:
        lora = f"LoRA r{result.lora_rank} · " if result.lora_rank else ""
        ckpt = "on" if result.gradient_checkpointing else "off"
        head = [f"{result.model} ({_params(result.model)} params) · {result.method} fine-tuning · {result.gpu} ({result.gpu_memory_gib:g} GiB)",
                f"seq_len {result.seq_len} · micro_batch {result.micro_batch} · {lora}gradient checkpointing {ckpt}"]
        rows, share = TRAIN_ROWS, f"{planner.TRAIN_MEMORY_FRACTION:.0%}"
    table = [{"component": k, "gib": f"{result.memory_gib[k]:.2f}", "what": what} for k, what in rows.items()]
    table.append({"component": "total", "gib": f"{result.total_gib:.2f}", "what": "all GPUs together, before sharding"})
    p, kv = result.placement, result.kv_cache
    lines = [*head, "", render_table(table, ["component", "gib", "what"]), "",
             f"per GPU:    {result.per_gpu_gib:.2f} GiB of {result.usable_gib:.1f} usable ({share} of {result.gpu_memory_gib:g})",
             f"KV cache:   {kv.per_token_bytes / 2**20:.4g} MiB/token (MHA would be {kv.mha_per_token_bytes / 2**20:.4g}: "
             f"{kv.gqa_reduction:g}x), {kv.full_context_gib:.2f} GiB for {kv.tokens} tokens"]
    if serving:
        lines.append(f"KV room:    {result.kv_capacity_tokens} tokens = {result.max_full_length_sequences} concurrent full-length sequences")
    bundle = json.dumps(p.bundles[0])
    lines += ["",
              f"placement:  {p.workers} worker(s) x {p.gpus_per_worker} GPU · tensor parallel {p.tensor_parallel} · "
              f"FSDP {'yes' if p.fsdp else 'no'} · {p.nodes} node(s)",
              f"bundles:    {p.workers} x {bundle} · strategy {p.strategy}",
              f"verdict:    {'fits' if result.fits else 'DOES NOT FIT'}"]
    lines += ["notes:", *[f"  - {n}" for n in result.notes]] if result.notes else []
    return "\n".join(lines)
