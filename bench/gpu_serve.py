"""GPU serving benchmark: our endpoint with the vllm engine vs `vllm` direct, Llama 2 7B shape.

    python bench/gpu_serve.py                       # on a lent GPU: ~8 min
    python bench/gpu_serve.py --dry-run             # CPU: llama2-tiny, exercises the script path

One run, same random-init checkpoint and prompts for both systems: 128 prompts of 128 token ids,
256 output tokens, greedy, EOS ignored, at concurrency 16 and 64. Reports output tokens/s and
TTFT p50/p95 and the ratio endpoint/direct (target >= 0.9: Ray Serve + ingress overhead <= 10%).
The 7B checkpoint is written with random weights (bf16, ~13 GB) because nothing can be
downloaded on the GPU machine. If vLLM is not importable the run records `skipped` with the
reason instead of failing. Results: bench/results/gpu_serve.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "platform"))


def _serve_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench/serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def llama2_7b_random(out: Path, tokenizer_bytes: bytes) -> Path:
    """A random-init Llama 2 7B checkpoint (bf16), built on the GPU to be quick."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmplatform.catalog import to_hf_config
    from llmplatform.tiny import tokenizer as tiny_tok

    cfg = LlamaConfig(**to_hf_config("llama2-7b"), dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    tiny_tok.write_tokenizer(out, 4096, tokenizer_bytes)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: llama2-tiny, 8 prompts x 16 tokens, concurrency 2")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu_serve.json"))
    ap.add_argument("--cache", default="/tmp/llmp-gpu-bench")
    ap.add_argument("--concurrency", default=None)
    args = ap.parse_args(argv)
    sb = _serve_bench()
    result: dict = {"dry_run": args.dry_run, "systems": {}, "skipped": {}}
    levels = [int(c) for c in (args.concurrency or ("2" if args.dry_run else "16,64")).split(",")]
    n, p_len, o_len = (8, 16, 16) if args.dry_run else (128, 128, 256)
    result["workload"] = {"model": "llama2-tiny-random" if args.dry_run else "llama2-7b shape (random init, bf16)",
                          "prompts": n, "prompt_tokens": p_len, "output_tokens": o_len, "concurrency": levels}
    if importlib.util.find_spec("vllm") is None:
        reason = "vllm is not importable in this Python; run on a machine with vLLM (GPU) or build .venv-vllm"
        result["skipped"] = {"vllm_direct": reason, "vllm_endpoint": reason}
        return _write(result, args.out)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.dry_run:
        from llmplatform.tiny import ensure_tiny_model

        model_dir = ensure_tiny_model("random", cache)
    else:
        model_dir = llama2_7b_random(cache / "llama2-7b-random", sb._spm_32k())
    result["setup_s"] = round(time.time() - t0, 1)
    from transformers import AutoConfig

    prompts = sb.make_prompts(AutoConfig.from_pretrained(model_dir).vocab_size, n, p_len)
    sb.VLLM_VENV = Path(sys.executable).parent.parent  # this Python has vLLM
    for system in ("vllm_direct", "vllm_endpoint"):
        proc = None
        try:
            if system == "vllm_direct":
                proc, url, name = sb.start_vllm_direct(model_dir)
            else:
                proc, url, name = sb.start_endpoint(model_dir, "vllm", sys.executable)
            sb.run_http(url, name, prompts[:4], 4, 4, 60)  # warm-up
            for c in levels:
                res = sb.run_http(url, name, prompts, c, o_len, 240)
                result["systems"].setdefault(system, {})[str(c)] = res
                print(system, c, res, flush=True)
        except Exception as exc:
            result["skipped"][system] = f"failed: {type(exc).__name__}: {str(exc)[-800:]}"
        finally:
            if proc is not None:
                sb.stop(proc)
    d, e = result["systems"].get("vllm_direct", {}), result["systems"].get("vllm_endpoint", {})
    result["endpoint_vs_direct"] = {c: round(e[c]["tok_per_s"] / d[c]["tok_per_s"], 3) for c in d if c in e and d[c]["tok_per_s"]}
    return _write(result, args.out)


def _write(result: dict, out: str) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("skipped", "endpoint_vs_direct")}, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    main()
