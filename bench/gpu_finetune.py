"""GPU fine-tuning benchmark: tokens/s and peak memory for LoRA and QLoRA on a Llama 2 shape.

    python bench/gpu_finetune.py                       # llama2-7b shape on the GPU (~5-8 min on an H100)
    python bench/gpu_finetune.py --model llama2-tiny   # CPU dry run (the tests run this)

Nothing is downloaded: the model is the catalog shape with random weights, written once as a
plain HF checkpoint so LoRA and QLoRA load it through the platform's own code
(`llmplatform.training.model_setup`: bf16 base + peft LoRA; 4-bit NF4 double-quant base +
`prepare_model_for_kbit_training` + LoRA), and batches are random token ids (no tokenizer).
Tokens/s counts every trained token of the timed steps (after warm-up); peak memory is
`torch.cuda.max_memory_allocated` during training on a GPU, the process's max RSS on a CPU.
Results go to `bench/results/gpu_finetune.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform as host
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from llmplatform import catalog  # noqa: E402
from llmplatform.resolve import resolve  # noqa: E402
from llmplatform.specs import parse_spec  # noqa: E402
from llmplatform.training import loop, model_setup, optimizer as optim  # noqa: E402


def write_random_checkpoint(model_name: str, out: Path, device: torch.device) -> float:
    """Random-init the catalog shape on `device` and save it as an HF checkpoint; returns seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    config = LlamaConfig(**catalog.to_hf_config(model_name))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = dtype
    model.save_pretrained(str(out))
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def bench_method(method: str, model_dir: Path, vocab: int, args, device: torch.device) -> dict:
    """Load base + adapters with the platform's code, then time optimizer steps on random tokens."""
    spec = parse_spec("finetune", {
        "name": f"bench-{method}", "base_model": str(model_dir), "method": method,
        "data": {"train": "random-tokens", "max_seq_length": args.seq_len},
        "lora": {"rank": args.rank, "alpha": 2 * args.rank, "dropout": 0.0},
        "hyperparameters": {"micro_batch_size": args.batch, "gradient_checkpointing": args.grad_ckpt,
                            "optimizer": "adamw" if method == "lora" else "paged_adamw_32bit", "learning_rate": 1e-4},
    })
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    gpus = {"gpus_per_worker": 1} if device.type == "cuda" else {}
    plan = resolve(spec.model_copy(update={"resources": spec.resources.model_copy(update=gpus)})).require()
    model = model_setup.load_for_training(spec, model_dir, device, plan["quantization"], plan["precision"])
    load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = optim.build_optimizer(model, spec.hyperparameters)
    amp = model_setup.autocast_dtype(plan["precision"])
    g = torch.Generator(device="cpu").manual_seed(0)
    timed_tokens, timed_s, losses = 0, 0.0, []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=g).to(device)  # [B, S]
        batch = {"input_ids": ids, "labels": ids}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits = loop.forward(model, batch, amp, device.type)
        loss, _, n = loop.token_loss(logits, batch["labels"])
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed_s += time.perf_counter() - t
            timed_tokens += args.batch * args.seq_len
        losses.append(float(loss.detach() / n))
    result = {
        "method": method, "load_s": round(load_s, 1), "trainable_params": trainable,
        "tokens_per_s": round(timed_tokens / timed_s, 1), "step_s": round(timed_s / args.steps, 3),
        "peak_memory_gib": round(peak_memory_gib(device), 2), "loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3),
        "quantized_layers": len(model_setup.quantized_layers(model)),
    }
    del model, opt
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2-7b", help="catalog shape (llama2-7b, llama2-13b, llama2-tiny, ...)")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--seq-len", type=int, default=None, help="default 1024 on GPU, 64 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch; default 4 on GPU, 2 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 10 on GPU, 2 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 3 on GPU, 1 on CPU")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_finetune.json"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    args.seq_len = args.seq_len or (1024 if gpu else 64)
    args.batch = args.batch or (4 if gpu else 2)
    args.steps = args.steps or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if not gpu:
        torch.set_num_threads(1)
    shape = catalog.get_model(args.model)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="gpuft") as tmp:
        model_dir = Path(tmp) / "model"
        init_s = write_random_checkpoint(args.model, model_dir, device)
        print(f"random {args.model} ({shape.params_b} B params) written in {init_s:.0f} s", flush=True)
        for method in args.methods.split(","):
            results.append(bench_method(method, model_dir, shape.vocab, args, device))
            print(json.dumps(results[-1]), flush=True)
    report = {
        "model": args.model, "params_b": shape.params_b, "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({host.processor() or host.machine()})",
        "seq_len": args.seq_len, "micro_batch": args.batch, "timed_steps": args.steps, "lora_rank": args.rank,
        "gradient_checkpointing": args.grad_ckpt, "torch": torch.__version__, "init_s": round(init_s, 1),
        "total_s": round(time.perf_counter() - started, 1), "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n| method | tokens/s | step s | peak GiB | load s | trainable |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['tokens_per_s']} | {r['step_s']} | {r['peak_memory_gib']} | {r['load_s']} | {r['trainable_params']:,} |")
    print(f"\nwrote {args.out} ({report['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
