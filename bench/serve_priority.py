"""CPU priority A/B for our vllm endpoint on a host without a GPU (needs `.venv-vllm` and root).

    .venv/bin/python bench/serve_priority.py --passes 4   # ~10 min on 2 cores; bench/results/serve_priority.json

One endpoint, started as bench/serve.py starts it (the CPU partition of `platformctl up`). Between
passes the nice of its processes is set live, per class: `scheduler` (VLLM::EngineCore), `shard`
(VLLM::Worker), `serving` (every other Ray worker: Serve proxy, controller, replica); the GCS and
raylet keep theirs. Each pass is the standard workload at concurrency 16 (64 prompts x 64 tokens in,
128 out), configurations alternating. Ray starts its workers at nice 15
(`RAY_worker_niceness`), and vLLM's processes inherit it from the replica; `ray default` is that
state, `scheduler -10` is what the vllm engine ships (llmplatform.serving.engines.vllm).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import serve as bench  # bench/serve.py: the endpoint, workload and HTTP client

RAY_WORKER_NICE = 15
CONFIGS = {
    "ray default (all 15)": {"serving": RAY_WORKER_NICE, "scheduler": RAY_WORKER_NICE, "shard": RAY_WORKER_NICE},
    "scheduler -10 (ships)": {"serving": RAY_WORKER_NICE, "scheduler": -10, "shard": RAY_WORKER_NICE},
    "all 0": {"serving": 0, "scheduler": 0, "shard": 0},
    "all 0, scheduler -10": {"serving": 0, "scheduler": -10, "shard": 0},
}


def process_class(comm: str) -> str | None:
    if comm == "VLLM::Worker":
        return "shard"
    if comm.startswith("VLLM::EngineCor"):
        return "scheduler"
    return "serving" if comm.startswith("ray::") else None  # GCS, raylet, agents: left alone


def apply(session: int, config: dict[str, int]) -> None:
    from llmplatform.cpus import set_process_nice

    for pid, comm, _ in bench.session_procs(session):
        cls = process_class(comm)
        if cls and not set_process_nice(pid, config[cls]):
            raise SystemExit(f"cannot set nice {config[cls]} on {comm} ({pid}): run as root or with CAP_SYS_NICE")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, default=4, help="passes per configuration")
    ap.add_argument("--out", default=str(bench.ROOT / "bench/results/serve_priority.json"))
    ap.add_argument("--cache", default=str(Path(bench.tempfile.gettempdir()) / "llmp-bench-models"))
    args = ap.parse_args(argv)
    ok, why = bench.vllm_available()
    if not ok:
        raise SystemExit(f"needs vLLM: {why}")
    from llmplatform import cpus
    from transformers import AutoConfig

    partition = cpus.plan("auto", os.sched_getaffinity(0), cpus.gpu_present())
    model_dir = bench.bench_model(Path(args.cache), quick=False)
    prompts = bench.make_prompts(AutoConfig.from_pretrained(model_dir).vocab_size, 64, 64)
    passes: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    proc, url, name = bench.start_endpoint(model_dir, "vllm", str(bench.VLLM_VENV / "bin/python"), partition)
    try:
        for rnd in range(args.passes):
            for label, config in CONFIGS.items():
                apply(proc.pid, config)
                bench.run_http(url, name, prompts[:4], 4, 4, 30)  # warm-up
                before = bench.session_cpu(proc.pid)
                res = bench.with_cpu(bench.run_http(url, name, prompts, 16, 128, 45), before, bench.session_cpu(proc.pid))
                passes[label].append(res)
                print(f"pass {rnd} {label:24s} {res}", flush=True)
    finally:
        bench.stop(proc)
    result = {"workload": {"model": "llama2-serve-bench (random init, bf16)", "prompts": 64, "prompt_tokens": 64, "output_tokens": 128,
                           "concurrency": 16, "passes": args.passes},
              "machine": {"cpus": os.cpu_count(), "endpoint_cpu_partition": partition.to_dict() if partition else None},
              "configs": CONFIGS,
              "results": {label: {"tok_per_s": [r["tok_per_s"] for r in rs],
                                  "median_tok_per_s": statistics.median(r["tok_per_s"] for r in rs),
                                  "median_ttft_p95_ms": statistics.median(r["ttft_p95_ms"] for r in rs),
                                  "median_serving_cpu_ms_per_token": statistics.median(r["serving_cpu_ms_per_token"] for r in rs)}
                          for label, rs in passes.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["results"], indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
