"""The GPU device check: one part of `bench/device_check.sh` per call (see that script and bench/README.md).

    python bench/device_check.py --part finetune   # LoRA seq 2048 + QLoRA mb 1 seq 1024, Llama 2 7B shape
    python bench/device_check.py --part serve      # the transformers engine at 1/8/16 streams vs sequential generate
    python bench/device_check.py --part probe70b   # 70B-shape QLoRA at 1 and 2 decoder layers, extrapolated
    python bench/device_check.py --part all --dry-run   # tiny shapes on the CPU (the tests run this)

Every part loads its model through the platform's own code (`training.model_setup`, `serving.engines.hf`)
from a random-init checkpoint written once under --workdir (nothing is downloaded), and writes
`<out-dir>/device_check_<part>.json` as soon as each measurement is done, so a run cut short keeps
what it measured. Planner figures (`llmplatform.planner`) are recorded next to each measured peak;
tests/unit/test_planner_measured.py holds the planner to them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from llmplatform import catalog, planner  # noqa: E402
from llmplatform.export.merge import copy_tokenizer  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10G": 70.0}  # dense, datasheets
LORA_DROPOUT = 0.0  # the runs' LoRA dropout (the planner models what dropout > 0 adds)
GPU_TYPES = {"H200": "h200-141gb", "H100": "h100-80gb", "A100": "a100-80gb", "L4": "l4-24gb"}


# ---------------------------------------------------------------------------- shared


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_type(device: torch.device) -> str:
    """The planner's GPU for this device (the H200 when unknown or on CPU, for the figures' sake)."""
    name = device_name(device)
    return next((t for key, t in GPU_TYPES.items() if key in name), "h200-141gb")


def peak_tflops(device: torch.device) -> float | None:
    name = device_name(device)
    return next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)


def shape_with_layers(model: str, layers: int) -> catalog.ModelShape:
    """The catalog shape of `model` cut to `layers` decoder layers (params recomputed)."""
    return dataclasses.replace(catalog.get_model(model), name=f"{model}-{layers}l", layers=layers, params_b=None)


def write_checkpoint(shape: catalog.ModelShape, out: Path, device: torch.device) -> float:
    """Random-init `shape` on `device` (bf16 on GPUs) and save it as an HF checkpoint; returns seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**catalog.to_hf_config(shape)))
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = dtype
    model.save_pretrained(str(out), max_shard_size="20GB")
    del model
    free(device)
    return time.perf_counter() - t0




def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peaks_gib(device: torch.device) -> dict:
    if device.type != "cuda":
        import resource

        return {"peak_allocated_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Report:
    """One part's JSON, rewritten after every measurement."""

    def __init__(self, path: Path, header: dict):
        self.path, self.data = path, {**header, "results": []}
        self.write()

    def add(self, result: dict) -> None:
        self.data["results"].append(result)
        self.write()
        print(json.dumps(result), flush=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def header(part: str, device: torch.device, dry_run: bool) -> dict:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"part": part, "dry_run": dry_run, "device": device_name(device), "gpu_type": gpu_type(device),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions}


# ---------------------------------------------------------------------------- fine-tuning


def flops_per_token(shape: catalog.ModelShape, seq_len: int, checkpointing: bool) -> dict:
    """Training FLOPs per token. `model` is the usual 6N + 12*L*h*s (PaLM's MFU convention, which counts
    weight gradients); `lora` is what LoRA computes: forward 2N, input gradients 2N, no base weight
    gradients, attention 4*L*h*s forward and twice that backward, plus a forward again when checkpointing."""
    n = shape.layers * shape.layer_linear_params + shape.vocab * shape.hidden  # matmul weights (lm_head; not the lookup)
    attn = 4 * shape.layers * shape.hidden * seq_len
    lora = 4 * n + 3 * attn + ((2 * n + attn) if checkpointing else 0)
    return {"model": 6 * n + 3 * attn, "lora": lora}


def matmul_tflops(device: torch.device, size: int) -> float:
    """Measured bf16 matmul rate (the ceiling MFU is read against), median of 10 after 3 warm-ups."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    del a, b
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12


def train_steps(method: str, model_dir: Path, shape: catalog.ModelShape, device: torch.device, *, seq_len: int, batch: int,
                checkpointing: bool, rank: int, warmup: int, steps: int) -> dict:
    """Load base + adapters with the platform's code and time optimizer steps on random token ids."""
    from llmplatform.resolve import resolve
    from llmplatform.specs import parse_spec
    from llmplatform.training import loop, model_setup, optimizer as optim

    spec = parse_spec("finetune", {
        "name": f"devcheck-{method}", "base_model": str(model_dir), "method": method,
        "data": {"train": "random-tokens", "max_seq_length": seq_len},
        "lora": {"rank": rank, "alpha": 2 * rank, "dropout": LORA_DROPOUT},
        "hyperparameters": {"micro_batch_size": batch, "gradient_checkpointing": checkpointing,
                            "optimizer": "adamw" if method == "lora" else "paged_adamw_32bit", "learning_rate": 1e-4},
    })
    gpus = {"gpus_per_worker": 1} if device.type == "cuda" else {}
    plan = resolve(spec.model_copy(update={"resources": spec.resources.model_copy(update=gpus)})).require()
    reset_peak(device)
    t0 = time.perf_counter()
    model = model_setup.load_for_training(spec, model_dir, device, plan["quantization"], plan["precision"])
    load_s = time.perf_counter() - t0
    load_peak = peaks_gib(device)["peak_allocated_gib"]  # loading may hold a 16-bit matrix before quantising it
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peaks below are training's: weights, adapters, optimizer, activations
    opt = optim.build_optimizer(model, spec.hyperparameters)
    amp = model_setup.autocast_dtype(plan["precision"])
    g = torch.Generator(device="cpu").manual_seed(0)
    step_s, losses = [], []
    try:
        for step in range(warmup + steps):
            ids = torch.randint(3, shape.vocab, (batch, seq_len), generator=g).to(device)  # [B, S]
            batch_ = {"input_ids": ids, "labels": ids}
            sync(device)
            t = time.perf_counter()
            logits = loop.forward(model, batch_, amp, device.type)
            loss, _, n = loop.token_loss(logits, batch_["labels"])
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del logits
            sync(device)
            if step >= warmup:
                step_s.append(time.perf_counter() - t)
            losses.append(round(float(loss.detach() / n), 4))
        result = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "quantized_layers": len(model_setup.quantized_layers(model))}
    finally:
        del model, opt
    median = sorted(step_s)[len(step_s) // 2]
    tokens = batch * seq_len
    return {"method": method, "seq_len": seq_len, "micro_batch": batch, "gradient_checkpointing": checkpointing, "lora_rank": rank,
            "lora_dropout": LORA_DROPOUT,
            "load_s": round(load_s, 1), "load_peak_allocated_gib": load_peak, "step_s_median": round(median, 4), "tokens_per_s": round(tokens / median, 1),
            "loss_first": losses[0], "loss_last": losses[-1], **result, **peaks_gib(device)}


def planner_figure(shape: catalog.ModelShape, method: str, gpu: str, seq_len: int, batch: int, rank: int, checkpointing: bool) -> dict:
    p = planner.plan_training(shape, method, gpu, seq_len=seq_len, micro_batch=batch, lora_rank=rank, gradient_checkpointing=checkpointing,
                              lora_dropout=LORA_DROPOUT)
    return {"total_gib": round(p.total_gib, 3), "without_overhead_gib": round(p.total_gib - p.memory_gib["overhead"], 3),
            "breakdown_gib": {k: round(v, 3) for k, v in p.memory_gib.items()}}


def part_finetune(args, device: torch.device, report: Report) -> None:
    model = "llama2-tiny" if args.dry_run else "llama2-7b"
    shape = catalog.get_model(model)
    report.data.update(model=model, params_b=shape.params_b)
    if device.type == "cuda":
        report.data["matmul_tflops_measured"] = round(matmul_tflops(device, 8192), 1)
        report.data["peak_tflops_datasheet"] = peak_tflops(device)
        report.write()
    model_dir = args.workdir / f"{model}-random"
    report.data["checkpoint_write_s"] = round(write_checkpoint(shape, model_dir, device), 1)
    report.write()
    runs = [  # (method, seq, micro-batch candidates, checkpointing): the targets
        ("lora", 64 if args.dry_run else 2048, [2] if args.dry_run else [4, 2, 1], False),
        ("qlora", 64 if args.dry_run else 1024, [1], True),
    ]
    warmup, steps = (1, 2) if args.dry_run else (2, 5)
    for method, seq, batches, ckpt in runs:
        for batch in batches:
            error = None
            try:
                r = train_steps(method, model_dir, shape, device, seq_len=seq, batch=batch, checkpointing=ckpt, rank=16, warmup=warmup, steps=steps)
            except torch.OutOfMemoryError as exc:  # the traceback (and the tensors its frames hold) goes with the except block
                error = f"OutOfMemoryError: {str(exc)[:300]}"
            if error:
                free(device)
                report.add({"method": method, "seq_len": seq, "micro_batch": batch, "error": error})
                continue
            flops = flops_per_token(shape, seq, ckpt)
            peak = peak_tflops(device)
            r["mfu"] = round(r["tokens_per_s"] * flops["model"] / (peak * 1e12), 4) if peak else None
            r["lora_hfu"] = round(r["tokens_per_s"] * flops["lora"] / (peak * 1e12), 4) if peak else None
            r["planner"] = planner_figure(shape, method, gpu_type(device), seq, batch, 16, ckpt)
            report.add(r)
            free(device)
            break


# ---------------------------------------------------------------------------- serving


async def _stream(engine, prompt: list[int], out_tokens: int) -> dict:
    from llmplatform.serving.engines import GenerationRequest

    t0 = time.perf_counter()
    ttft, n = None, 0
    async for event in engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=out_tokens, temperature=0.0, ignore_eos=True)):
        if ttft is None and event.get("completion_tokens"):
            ttft = time.perf_counter() - t0
        n = event.get("completion_tokens", n)
    return {"ttft_s": ttft, "tokens": n, "latency_s": time.perf_counter() - t0}


async def _level(engine, prompts: list[list[int]], concurrency: int, out_tokens: int) -> dict:
    queue = list(prompts)
    done: list[dict] = []

    async def client():
        while queue:
            done.append(await _stream(engine, queue.pop(0), out_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ttfts = sorted(d["ttft_s"] for d in done)
    return {"concurrency": concurrency, "requests": len(done), "output_tokens": sum(d["tokens"] for d in done),
            "tok_per_s": round(sum(d["tokens"] for d in done) / wall, 1), "wall_s": round(wall, 2),
            "ttft_p50_ms": round(1000 * ttfts[len(ttfts) // 2], 1), "ttft_max_ms": round(1000 * ttfts[-1], 1)}


def write_lora_adapter(shape: catalog.ModelShape, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """A peft LoRA adapter (q_proj, v_proj) for `shape` with random non-zero weights, written directly as
    adapter_config.json + adapter_model.safetensors (no second copy of the base model needed)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(shape.layers):
        for module, width in (("q_proj", shape.hidden), ("v_proj", shape.kv_dim)):
            key = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, shape.hidden, generator=g) / shape.hidden**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=g) * 0.5
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": None, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


async def engine_features(engine, shape: catalog.ModelShape, prompts: list[list[int]], adapter_dir: Path, out_tokens: int) -> dict:
    """What else the engine does on this device: seeded sampling repeats, and one batch that mixes the
    base with a LoRA adapter (peft's per-row adapter_names) gives the adapter's rows different tokens."""
    from llmplatform.serving.engines import GenerationRequest

    async def tokens(prompt, **kw) -> list[int]:
        last = {}
        async for event in engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=out_tokens, ignore_eos=True, **kw)):
            last = event
        return last.get("token_ids", [])

    sampled = [await tokens(prompts[0], temperature=0.8, top_p=0.9, seed=11) for _ in range(2)]
    path = str(write_lora_adapter(shape, adapter_dir))
    t0 = time.perf_counter()
    mixed = await asyncio.gather(*[tokens(p, temperature=0.0, **({"adapter_id": "bench/1", "adapter_path": path} if i % 2 else {}))
                                   for i, p in enumerate(prompts[:8])])
    mixed_s = time.perf_counter() - t0
    base = await asyncio.gather(*[tokens(p, temperature=0.0) for p in prompts[:8]])
    return {"seeded_sampling_repeats": sampled[0] == sampled[1] and len(sampled[0]) == out_tokens,
            "adapter_rows_differ_from_base": all(mixed[i] != base[i] for i in range(1, len(mixed), 2)),
            "base_rows_unchanged_in_mixed_batch": all(mixed[i] == base[i] for i in range(0, len(mixed), 2)),
            "mixed_batch_tok_per_s": round(sum(len(m) for m in mixed) / mixed_s, 1), "adapters_loaded": engine.info()["adapters_loaded"]}


def sequential_generate(model, prompts: list[list[int]], out_tokens: int, device: torch.device) -> dict:
    """The peer: transformers `generate`, one request after another, greedy, no EOS stop."""
    total, t0 = 0, time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                             do_sample=False, pad_token_id=0)
        total += out.shape[1] - ids.shape[1]
    sync(device)
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "output_tokens": total, "tok_per_s": round(total / wall, 1), "wall_s": round(wall, 2)}


def part_serve(args, device: torch.device, report: Report) -> None:
    import random

    from llmplatform.serving.engines.hf import HFEngine

    model = "llama2-tiny" if args.dry_run else "llama2-7b"
    shape = catalog.get_model(model)
    model_dir = args.workdir / f"{model}-random"
    report.data["checkpoint_write_s"] = round(write_checkpoint(shape, model_dir, device), 1)
    if not (model_dir / "tokenizer_config.json").is_file():
        if args.tokenizer is None:
            raise SystemExit("--tokenizer DIR is needed (a tokenizer with the model's vocabulary; bench/device_check.sh prepare writes one)")
        copy_tokenizer(args.tokenizer, model_dir)
    levels = [1, 2] if args.dry_run else [1, 8, 16]
    prompt_len, out_tokens = (16, 8) if args.dry_run else (64, 128)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, shape.vocab) for _ in range(prompt_len)] for _ in range(max(8, 2 * max(levels)))]
    report.data["workload"] = {"model": f"{model} (random init)", "prompt_tokens": prompt_len, "output_tokens": out_tokens,
                               "greedy": True, "ignore_eos": True, "concurrency": levels}
    reset_peak(device)
    t0 = time.perf_counter()
    engine = HFEngine(str(model_dir), dtype="auto", max_batch_size=max(levels), max_model_len=prompt_len + out_tokens + 8,
                      threads=1 if device.type == "cpu" else 4)
    report.data.update(engine_load_s=round(time.perf_counter() - t0, 1), engine=engine.info())
    try:
        asyncio.run(_level(engine, prompts[:2], 2, 4))  # warm-up: kernels, cuBLAS handles
        for c in levels:
            n = max(3, 2 * c) if c > 1 else 3
            report.add({"system": "hf_engine", **asyncio.run(_level(engine, prompts[:n], c, out_tokens)), **peaks_gib(device)})
        with engine._lock, torch.inference_mode():  # the engine is idle; its model runs the peer
            sequential_generate(engine.model, prompts[:1], 4, device)  # warm-up
            seq = sequential_generate(engine.model, prompts[:3], out_tokens, device)
        report.add({"system": "sequential_generate", "concurrency": 1, **seq})
        report.data["features"] = asyncio.run(engine_features(engine, shape, prompts, args.workdir / "adapter", out_tokens // 4))
        report.write()
    finally:
        engine.shutdown()
    by_c = {r["concurrency"]: r["tok_per_s"] for r in report.data["results"] if r["system"] == "hf_engine"}
    report.data["engine_vs_sequential"] = {str(c): round(v / seq["tok_per_s"], 2) for c, v in by_c.items()}
    report.write()


# ---------------------------------------------------------------------------- 70B memory probe


def part_probe70b(args, device: torch.device, report: Report) -> None:
    """QLoRA peak memory at 1 and 2 decoder layers of the 70B shape; a line through the two gives the
    fixed part (embeddings, lm_head, logits) and the per-layer part, extrapolated to all layers."""
    model = "llama2-tiny" if args.dry_run else "llama2-70b"
    full = catalog.get_model(model)
    seq, batch, rank = (64, 1, 16) if args.dry_run else (1024, 1, 16)
    report.data.update(model=model, seq_len=seq, micro_batch=batch, lora_rank=rank, gradient_checkpointing=True)
    gpu = gpu_type(device)
    peaks = {}
    for layers in (1, 2):
        shape = shape_with_layers(model, layers)
        model_dir = args.workdir / f"{model}-{layers}layer-random"
        write_s = write_checkpoint(shape, model_dir, device)
        r = train_steps("qlora", model_dir, shape, device, seq_len=seq, batch=batch, checkpointing=True, rank=rank, warmup=1, steps=2)
        r.update(layers=layers, checkpoint_write_s=round(write_s, 1), planner=planner_figure(shape, "qlora", gpu, seq, batch, rank, True))
        report.add(r)
        peaks[layers] = r["peak_allocated_gib"]
        free(device)
    per_layer = peaks[2] - peaks[1]
    fixed = peaks[1] - per_layer
    extrapolated = fixed + full.layers * per_layer
    plan = planner_figure(full, "qlora", gpu, seq, batch, rank, True)
    report.data["extrapolation"] = {
        "layers": full.layers, "per_layer_gib": round(per_layer, 4), "fixed_gib": round(fixed, 3),
        "peak_allocated_gib": round(extrapolated, 3), "planner_without_overhead_gib": plan["without_overhead_gib"],
        "planner_total_gib": plan["total_gib"],
        "ratio_measured_to_planner": round(extrapolated / plan["without_overhead_gib"], 3),
    }
    report.write()


PARTS = {"finetune": part_finetune, "serve": part_serve, "probe70b": part_probe70b}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=[*PARTS, "all"], required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script's path in seconds")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm/llmp-device-check") if Path("/dev/shm").is_dir() else Path("/tmp/llmp-device-check"),
                    help="random checkpoints (tmpfs: the 7B one is 13 GB)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer files for the serving model (32000 pieces)")
    args = ap.parse_args(argv)
    device = torch.device("cpu") if args.dry_run or not torch.cuda.is_available() else torch.device("cuda", 0)
    if device.type == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA GPU here: run with --dry-run for the CPU path")
    if device.type == "cpu":
        torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.dry_run and args.tokenizer is None:
        from llmplatform import paths
        from llmplatform.tiny import ensure_tiny_model

        args.tokenizer = ensure_tiny_model("random", paths.model_cache())
    for part in PARTS if args.part == "all" else [args.part]:
        t0 = time.perf_counter()
        report = Report(args.out_dir / f"device_check_{part}.json", header(part, device, args.dry_run))
        PARTS[part](args, device, report)
        report.data["part_s"] = round(time.perf_counter() - t0, 1)
        report.write()
        print(f"{part}: {report.data['part_s']} s -> {report.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
