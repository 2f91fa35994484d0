"""vLLM's CPU LoRA path vs ours (serving/engines/vllm_lora_cpu.py), one llama2-serve-bench layer, no engine.

    .venv-vllm/bin/python bench/lora_ops_cpu.py [--out bench/results/lora_ops_cpu.json]

Times PunicaWrapperCPU.add_lora_linear, as vLLM's LoRA layers call it, for each linear layer of
one decoder layer of the llama2-serve-bench shape (hidden 512, MLP 1376, bf16): 8 adapter slots of
rank 8 with random weights on q/k/v/o and zero weights on the MLP (vLLM gives every linear layer
LoRA weights; the bench adapters target attention only). Three setups: vLLM's wrapper with vLLM's
torch ops, vLLM's wrapper with our ops, our fused add_lora_linear. Token counts: a 16-stream decode
step, a step with one 64-token prompt beside 15 decodes, a 16-prompt prefill. One thread, as each
vLLM CPU worker here runs. Also reports how far each setup's output is from vLLM's (max |diff|
/ max |y|; bf16 rounding differs where the sums run in another order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HIDDEN, MLP, RANK, SLOTS = 512, 1376, 8, 8


def timed(fn, n: int = 10, batches: int = 7) -> float:
    """ms per call: the median over `batches` batches of `n` calls (robust to a busy host)."""
    fn()
    per_call = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        per_call.append((time.perf_counter() - start) / n * 1e3)
    return statistics.median(per_call)


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--note", help="the conditions of the run, kept in the result (e.g. what else ran)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import vllm.lora.ops.torch_ops as theirs
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from llmplatform.serving.engines import vllm_lora_cpu as ours

    vllm_linear = punica_cpu.PunicaWrapperCPU.add_lora_linear
    g = torch.Generator().manual_seed(0)

    def layer(width_in: int, widths_out: tuple[int, ...], zero: bool):
        make = (lambda *s: torch.zeros(*s, dtype=torch.bfloat16)) if zero else (lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16))
        return width_in, tuple(make(SLOTS, 1, RANK, width_in) for _ in widths_out), tuple(make(SLOTS, 1, w, RANK) for w in widths_out)

    layers = {"qkv": layer(HIDDEN, (HIDDEN,) * 3, False), "o": layer(HIDDEN, (HIDDEN,), False),
              "gate_up": layer(HIDDEN, (MLP, MLP), True), "down": layer(MLP, (HIDDEN,), True)}
    steps = {"decode_16": torch.arange(16) % SLOTS, "mixed_79": torch.cat([torch.arange(15) % SLOTS, torch.full((64,), 3)]),
             "prefill_1024": torch.arange(1024) // 64 % SLOTS}
    setups = {"vllm": (theirs, vllm_linear), "vllm_wrapper_our_ops": (ours, vllm_linear), "ours_fused": (ours, ours.add_lora_linear)}
    result = {"measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "note": args.note,
              "shape": {"hidden": HIDDEN, "mlp": MLP, "rank": RANK, "slots": SLOTS, "dtype": "bfloat16", "threads": 1},
              "ms_per_layer": {}, "max_rel_diff_vs_vllm": {}}
    for step, indices in steps.items():
        tokens = len(indices)
        wrapper = punica_cpu.PunicaWrapperCPU(4096, 4096, "cpu")
        wrapper._token_lora_indices[:tokens] = indices
        wrapper.indices_len = [tokens] * 4
        wrapper.is_prefill = step != "decode_16"
        if wrapper.is_prefill:
            wrapper._update_prefill_metadata(wrapper.token_lora_indices)
        reference: dict[str, torch.Tensor] = {}
        for name, (module, linear) in setups.items():
            for op in ours.OPS:
                setattr(punica_cpu, op, getattr(module, op))
            per_layer, diff = {}, 0.0
            for lname, (width_in, a, b) in layers.items():
                x = torch.randn(tokens, width_in, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
                sizes = tuple(s.shape[2] for s in b)
                y = torch.zeros(tokens, sum(sizes), dtype=torch.bfloat16)
                linear(wrapper, y, x, a, b, 1.0, sizes)
                want = reference.setdefault(lname, y.clone()).float()
                diff = max(diff, float((y.float() - want).abs().max() / want.abs().max().clamp_min(1e-9)))
                per_layer[lname] = round(timed(lambda: linear(wrapper, y, x, a, b, 1.0, sizes)), 3)
            per_layer["total"] = round(sum(per_layer.values()), 3)
            result["ms_per_layer"].setdefault(step, {})[name] = per_layer
            result["max_rel_diff_vs_vllm"].setdefault(step, {})[name] = diff
            print(step, f"{name:22s}", per_layer, f"max |diff| / max |y| vs vLLM {diff:.2g}", flush=True)
    for op in ours.OPS:
        setattr(punica_cpu, op, getattr(theirs, op))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
