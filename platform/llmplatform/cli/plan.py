"""`platformctl plan`: GPU memory breakdown and Ray placement for a spec file, or a model, method and GPU.

`plan SPEC.yaml [--gpu T]` sizes a spec through the one resolve step (`llmplatform.resolve`), with
the spec's own sequence length, batch, rank and checkpointing; the flag form (`--model`, `--gpu`,
...) asks the planner a quick question. Prints a table for people or JSON for scripts; a plan that
does not fit (or a spec the target cannot satisfy) still prints, and exits 1.
"""

from __future__ import annotations

import json

import typer

from types import SimpleNamespace

from llmplatform import resolve
from llmplatform.catalog import get_model
from llmplatform.cli.output import OUTPUT_OPTION, OutputFormat, emit_json, render_table
from llmplatform.errors import PlatformError
from llmplatform.gpus import get_gpu

SERVE_MEMORY_FRACTION, TRAIN_MEMORY_FRACTION = 0.90, 0.95  # the planner's usable shares, for the table's wording

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
    spec_file: str = typer.Argument(None, metavar="[SPEC.yaml]", help="A fine-tune or serve spec to size (its GPU type, or --gpu)."),
    model: str = typer.Option(None, "--model", "-m", help="Catalog model: llama2-7b, llama2-13b, llama2-34b, llama2-70b, -chat variants, llama2-tiny, ..."),
    gpu: str = typer.Option(None, "--gpu", "-g", help="GPU type: a100-40gb, a100-80gb, h100-80gb, h200-141gb, l4-24gb, a10g-24gb, rtx4090-24gb, a6000-48gb, t4-16gb."),
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
    flags = {"--model": model, "--method": method, "--serve": serve or None, "--seq-len": seq_len, "--micro-batch": micro_batch,
             "--lora-rank": lora_rank, "--dtype": dtype, "--max-model-len": max_model_len, "--gpus-per-node": gpus_per_node}
    if spec_file:
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise typer.BadParameter(f"{', '.join(given)}: the spec file sets these; drop them (only --gpu and --output go with SPEC.yaml)")
        result = _spec_plan(spec_file, gpu)
    else:
        if not model or not gpu:
            raise typer.BadParameter("give a spec file (`platformctl plan SPEC.yaml`), or --model and --gpu", param_hint="--model/--gpu")
        result = _flag_plan(model, gpu, method, serve, seq_len, micro_batch, lora_rank, checkpointing, dtype, max_model_len, kv_cache_dtype, gpus_per_node)
    if output == OutputFormat.json:
        emit_json(result.to_dict())
    else:
        typer.echo(render_plan(result))
    if not result.fits:
        raise typer.Exit(1)


def _flag_plan(model, gpu, method, serve, seq_len, micro_batch, lora_rank, checkpointing, dtype, max_model_len, kv_cache_dtype, gpus_per_node):
    shape, device = get_model(model), get_gpu(gpu, gpus_per_node)
    if serve:
        if method is not None or seq_len is not None or micro_batch is not None or lora_rank is not None:
            raise PlatformError("--method, --seq-len, --micro-batch and --lora-rank are for fine-tuning plans; drop them, or drop --serve")
        return resolve.size_serving(shape, device, dtype or "auto", max_model_len, kv_cache_dtype)
    if dtype is not None or max_model_len is not None:
        raise PlatformError("--dtype and --max-model-len are for serving plans; add --serve, or drop them")
    return resolve.size_training(shape, method or "qlora", device, seq_len, micro_batch or 1, lora_rank or 16, checkpointing)


class _SpecPlan(SimpleNamespace):
    """The planner's part of a resolved plan, shaped like a planner result for `render_plan`."""

    @property
    def total_gib(self) -> float:
        return self.memory_gib["total"]

    def to_dict(self) -> dict:
        return self.doc


def _spec_plan(spec_file: str, gpu: str | None) -> _SpecPlan:
    from llmplatform.cli.resolve import resolve_file

    resolved = resolve_file(spec_file, "local", gpu)
    if resolved.plan is None:
        why = resolved.values["memory_per_worker_gib" if resolved.kind == "finetune" else "tensor_parallel"].reason
        raise PlatformError(f"{spec_file}: nothing to size ({why or 'no GPU type or catalog base model'}); set resources.gpu_type, or pass --gpu")
    doc = {**resolved.plan, "problems": [p.render() for p in resolved.problems]}
    kv = SimpleNamespace(**doc["kv_cache"])
    notes = list(doc["notes"]) + [f"refused: {p}" for p in doc["problems"] if "does not fit" not in p]
    fits = doc["fits"] and not resolved.problems
    return _SpecPlan(**{**doc, "kv_cache": kv, "placement": SimpleNamespace(**doc["placement"]), "notes": notes, "fits": fits}, doc=doc,
                     serving=doc["kind"] == "serving")


def _params(model: str) -> str:
    count = get_model(model).params
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def render_plan(result) -> str:
    """The plan as text (a planner result, or a spec's): header, memory table, KV cache, placement, verdict, notes."""
    serving = getattr(result, "serving", None)
    serving = type(result).__name__ == "ServingPlan" if serving is None else serving
    if serving:
        head = [f"{result.model} ({_params(result.model)} params) · serving · {result.gpu} ({result.gpu_memory_gib:g} GiB)",
                f"dtype {result.dtype} · kv cache {result.kv_cache_dtype} · max_model_len {result.max_model_len}"]
        rows, share = SERVE_ROWS, f"{SERVE_MEMORY_FRACTION:.0%}"
    else:
        lora = f"LoRA r{result.lora_rank} · " if result.lora_rank else ""
        ckpt = "on" if result.gradient_checkpointing else "off"
        head = [f"{result.model} ({_params(result.model)} params) · {result.method} fine-tuning · {result.gpu} ({result.gpu_memory_gib:g} GiB)",
                f"seq_len {result.seq_len} · micro_batch {result.micro_batch} · {lora}gradient checkpointing {ckpt}"]
        rows, share = TRAIN_ROWS, f"{TRAIN_MEMORY_FRACTION:.0%}"
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
