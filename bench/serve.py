"""Serving benchmark: our endpoint vs transformers baselines vs vLLM, on the standard workload.

    .venv/bin/python bench/serve.py --rounds 2      # full run (~35 min on 2 cores)
    .venv/bin/python bench/serve.py --quick         # CPU dry run with llama2-tiny (tests)

Workload (STACK-NOTES "standard serving workload"): the `llama2-serve-bench` shape (random init,
bf16, vocab 32000, hidden 512, 8 layers, 58M params) with a SentencePiece tokenizer of 32000
pieces; 64 prompts of exactly 64 token ids (sent as token-id prompts, so every system sees the
same tokens); 128 output tokens each, greedy, EOS ignored. For each concurrency level (1, 8, 16,
32) and each system: output tokens/s and TTFT p50/p95 (time from request to its first streamed
text). Systems: our endpoint with the hf engine; a sequential transformers `generate` loop
(served one request at a time behind a FIFO queue); transformers' continuous batching
(`generate_batch`, explicit small cache); `vllm` direct and our endpoint with the vllm engine
(only when `.venv-vllm` exists; otherwise recorded as skipped with the reason). Systems
alternate within each round; `--rounds N` takes medians. Results: bench/results/serve.json.
`hf_endpoint_accounted` / `vllm_endpoint_accounted` are the same endpoints with API keys, per-key
limits (far above the load, so each request asks the limiter and none is refused) and the usage
store on; the plain ones have auth and the usage store off. `targets` reports their throughput
ratio at 16 streams (`*_accounting_vs_plain`, target >= 0.97).
Multi-adapter workload: `hf_endpoint_adapters`, `vllm_endpoint_adapters` and `vllm_direct_adapters`
serve 8 LoRA adapters (rank 8 on q/k/v/o, `ADAPTERS` below) beside the base, and request k of the
load names adapter k mod 8, so 16 streams spread over 8 adapters; the base systems run the same
prompts without adapters. On CPU our endpoint's vLLM runs LoRA through our ops
(serving/engines/vllm_lora_cpu.py), vLLM direct through vLLM's own. `targets` gives each engine's adapters/base ratio at 16 streams
(target >= 0.8 for ours on vllm, and no worse than `vllm_direct_adapters_vs_base`: vLLM's own
multi-LoRA, `--enable-lora` with the same adapters, in the same run).
Our endpoints get their own Ray, started as `platformctl up` starts the local head (on a host
without a GPU: the CPU partition, `--cpu-partition`), with the serve spec's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = ROOT / ".venv-vllm"


# ---------------------------------------------------------------------------- model and prompts


def bench_model(cache: Path, quick: bool) -> Path:
    """The checkpoint under test: llama2-tiny (quick) or the llama2-serve-bench shape, random, bf16."""
    if quick:
        from llmplatform.tiny import ensure_tiny_model

        return ensure_tiny_model("random", cache)
    out = cache / "llama2-serve-bench-random"
    if (out / "config.json").is_file() and (out / "tokenizer.model").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmplatform.catalog import to_hf_config
    from llmplatform.tiny import tokenizer as tiny_tok

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**to_hf_config("llama2-serve-bench"), dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(out)
    tiny_tok.write_tokenizer(out, 4096, _spm_32k())
    return out


def _spm_32k() -> bytes:
    """A 32000-piece SentencePiece BPE model trained on the Python stdlib's source (~1 min)."""
    import io
    import sysconfig

    import sentencepiece as spm

    def lines():
        n = 0
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            for line in f.read_text(errors="ignore").splitlines():
                if line.strip():
                    yield line.strip()
                    n += 1
                    if n >= 400_000:
                        return

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=buf, vocab_size=32000, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, input_sentence_size=400_000,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return buf.getvalue()


ADAPTERS = 8
ADAPTER_RANK = 8


def bench_adapters(model_dir: Path, cache: Path, n: int = ADAPTERS, rank: int = ADAPTER_RANK) -> list[tuple[str, Path]]:
    """`n` LoRA adapters of `rank` on q/k/v/o for the model under test, random non-zero weights
    (a zero B would let an engine skip nothing, but keep the test honest about what is applied)."""
    out = []
    for i in range(n):
        d = cache / f"{model_dir.name}-lora{i}-r{rank}"
        out.append((f"a{i}", d))
        if (d / "adapter_config.json").is_file():
            continue
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(100 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                          init_lora_weights=False))
        model.save_pretrained(d)
    return out


def make_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(n)]


ENGINE_PROCESSES = ("VLLM::EngineCor", "VLLM::Worker")  # vLLM's model processes (name prefixes; the kernel's comm keeps 15 chars)


def session_procs(sid: int):
    """(pid, comm, psutil.Process) of each live process in session `sid` (a server we started with its
    own session; Ray gives each worker its own process group, so the session is what holds the
    replica and the vLLM processes under it). Zombies are left out."""
    import psutil

    for p in psutil.process_iter(["name", "status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                yield p.pid, p.info["name"], p
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue


def session_cpu(sid: int) -> dict[str, float]:
    """CPU seconds so far of the processes in session `sid`: vLLM's model processes ("engine")
    and everything else ("serving": HTTP, Ray Serve, the vLLM front end)."""
    import psutil

    out = {"engine": 0.0, "serving": 0.0}
    for _, comm, p in session_procs(sid):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out["engine" if comm.startswith(ENGINE_PROCESSES) else "serving"] += t.user + t.system
    return out


def with_cpu(res: dict, before: dict, after: dict) -> dict:
    """Add the server's CPU per output token (ms), split engine / serving layer."""
    tokens = max(res["output_tokens"], 1)
    for part in ("engine", "serving"):
        res[f"{part}_cpu_ms_per_token"] = round((after[part] - before[part]) * 1000 / tokens, 3)
    return res


def summarize(records: list[tuple[float, int]], wall: float) -> dict:
    """records: (ttft seconds, output tokens) per finished request."""
    ttfts = sorted(r[0] for r in records)
    tokens = sum(r[1] for r in records)

    def pct(p):
        return round(ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] * 1000, 1) if ttfts else None

    return {"requests": len(records), "output_tokens": tokens, "wall_s": round(wall, 2),
            "tok_per_s": round(tokens / wall, 1) if wall else None, "ttft_p50_ms": pct(0.5), "ttft_p95_ms": pct(0.95)}


# ---------------------------------------------------------------------------- HTTP clients


async def _stream_one(client, model: str, prompt: list[int], out_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ttft, usage = None, 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=out_tokens, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return (ttft if ttft is not None else time.perf_counter() - t0), usage


def run_http(base_url: str, model: str | list[str], prompts: list[list[int]], concurrency: int, out_tokens: int, cap_s: float) -> dict:
    """`model`: one name, or a list whose entries requests take in turn (request k: entry k mod len)."""
    from openai import AsyncOpenAI

    models = [model] if isinstance(model, str) else list(model)

    async def main():
        client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
        todo = list(enumerate(prompts))
        records: list[tuple[float, int]] = []
        start = time.perf_counter()

        async def worker():
            while todo and time.perf_counter() - start < cap_s:
                k, prompt = todo.pop(0)
                records.append(await _stream_one(client, models[k % len(models)], prompt, out_tokens))

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
        await client.close()
        return summarize(records, wall)

    return asyncio.run(main())


# ---------------------------------------------------------------------------- in-process baselines


class _FirstToken:
    """A generate() streamer that records when the first new token appears."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def run_sequential(model, prompts, concurrency: int, out_tokens: int, cap_s: float) -> dict:
    """One request at a time behind a FIFO queue, `concurrency` clients waiting on it."""
    import torch

    jobs: queue.Queue = queue.Queue()
    records, start = [], time.perf_counter()

    def server():
        while True:
            item = jobs.get()
            if item is None:
                return
            prompt, t0, done = item
            streamer = _FirstToken()
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                                     do_sample=False, streamer=streamer, pad_token_id=0)
            done.append(((streamer.first or time.perf_counter()) - t0, out.shape[1] - len(prompt)))

    def client(mine):
        for p in mine:
            if time.perf_counter() - start > cap_s:
                return
            done: list = []
            jobs.put((p, time.perf_counter(), done))
            while not done:
                time.sleep(0.002)
            records.append(done[0])

    srv = threading.Thread(target=server, daemon=True)
    srv.start()
    clients = [threading.Thread(target=client, args=(prompts[i::concurrency],)) for i in range(concurrency)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    jobs.put(None)
    srv.join()
    return summarize(records, time.perf_counter() - start)


def run_continuous_batching(model, prompts, concurrency: int, out_tokens: int, cap_s: float) -> dict:
    """transformers `generate_batch` in waves of `concurrency` (offline API: no per-token TTFT stream)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=out_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # explicit, small cache: the default reserved ~14 GB for a 1M-param model (STACK-NOTES)
    tokens_needed = concurrency * (len(prompts[0]) + out_tokens)
    cb = ContinuousBatchingConfig(page_size=32, num_blocks=max(8, tokens_needed // 32 + concurrency), max_batch_tokens=512,
                                  max_requests_per_batch=concurrency)
    records, start = [], time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        if time.perf_counter() - start > cap_s:
            break
        wave_t0 = time.perf_counter()
        out = model.generate_batch(inputs=prompts[i:i + concurrency], generation_config=gen, continuous_batching_config=cb,
                                   record_timestamps=True, progress_bar=False, warmup=False)
        for r in out.values():
            first = (r.timestamps or [time.perf_counter()])[0]
            records.append((first - wave_t0, len(r.generated_tokens)))
    return summarize(records, time.perf_counter() - start)


# ---------------------------------------------------------------------------- servers


def start_endpoint(model_dir: Path, engine: str, python: str, partition=None, accounting: bool = False,
                   adapters: list[tuple[str, Path]] | None = None) -> tuple[subprocess.Popen, str, str | list[str]]:
    """Our endpoint in a child process (own Ray, own process group): returns (proc, base_url, model).

    `partition` (llmplatform.cpus.CpuPartition): start its Ray on the front-end CPUs with
    the partition in its env, as `platformctl up` starts the local head. `accounting`: auth on
    with a keys file whose bench key has per-minute limits far above the load (so every request
    takes the limiter round trip and none is refused) and the usage store on (SQLite in a temp
    dir); without it auth and the usage store are off. `adapters`: (name, dir) served beside the
    base (all loaded at once: `max_loaded_adapters` = their count); the model names returned are
    then `BASE:NAME` per adapter."""
    port = _free_port()
    extra_env, auth = {"PLATFORM_USAGE_DB": "off"}, ""
    if accounting:
        from llmplatform.serving.keys import hash_key

        state = Path(tempfile.mkdtemp(prefix="bench-acct"))
        (state / "keys.txt").write_text(f"sha256:{hash_key('bench')} name=bench rpm=100000000 tpm=100000000000\n")
        extra_env = {"PLATFORM_USAGE_DB": f"sqlite:///{state}/usage.db"}
        auth = f", 'auth': {{'enabled': True, 'api_keys_file': '{state}/keys.txt', 'api_keys_env': None}}"
    listed = ""
    if adapters:
        refs = ", ".join(f"{{'name': '{name}', 'source': '{path}'}}" for name, path in adapters)
        listed = f", 'adapters': [{refs}]"
        auth += f", 'max_loaded_adapters': {len(adapters)}, 'max_lora_rank': {ADAPTER_RANK}"
    code = (
        "import os, sys, time, tempfile, ray\n"
        "from llmplatform.backends.serving import deploy_spec\n"
        "ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix='rb', dir='/tmp'), log_to_driver=False)\n"
        f"st = deploy_spec({{'name': 'bench', 'engine': '{engine}', 'max_model_len': 512,"
        " 'limits': {'max_concurrent_requests': 64, 'max_queued_requests': 64, 'max_batch_size': 32, 'request_timeout_s': 600},"
        f" 'dtype': 'bfloat16', 'model': {{'base': '{model_dir}', 'allow_dynamic_adapters': False{listed}}}{auth}}}, http_port={port})\n"
        "print('READY', st['url'], flush=True)\n"
        "while True: time.sleep(3600)\n"
    )
    from llmplatform import cpus
    from llmplatform.serving.environment import SERVE_FAST_PATH_ENV  # what `platformctl up` gives the Ray head

    env = {**SERVE_FAST_PATH_ENV, **os.environ, "RAY_AUTH_MODE": "disabled",
           "PLATFORM_ENGINE_THREADS": os.environ.get("PLATFORM_ENGINE_THREADS", "1"), **(partition.env() if partition else {}), **extra_env}
    proc = subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=ROOT, preexec_fn=cpus.pin_child(partition.front) if partition else None)
    url = _wait_ready(proc, 420)
    return proc, url, ([f"{model_dir}:{name}" for name, _ in adapters] if adapters else str(model_dir))


def start_vllm_direct(model_dir: Path, adapters: list[tuple[str, Path]] | None = None) -> tuple[subprocess.Popen, str, str | list[str]]:
    """`vllm serve` (its OpenAI server module); with `adapters`, multi-LoRA as vLLM documents it:
    `--enable-lora --lora-modules NAME=DIR ...`, every adapter resident (`--max-loras`)."""
    port = _free_port()
    cmd = [str(VLLM_VENV / "bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "512"]
    if adapters:
        cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(ADAPTER_RANK),
                "--lora-modules", *[f"{name}={path}" for name, path in adapters]]
    if not _cuda():
        cmd += ["--gpu-memory-utilization", os.environ.get("PLATFORM_VLLM_MEMORY_FRACTION", "0.15")]  # CPU: share of host RAM
    # vLLM as shipped: without our LoRA ops (vllm_lora_cpu), even where its plugin entry point is installed
    env = {**{k: v for k, v in os.environ.items() if k != "PLATFORM_VLLM_LORA_OPS"}, "VLLM_CPU_KVCACHE_SPACE": "2"}
    proc = subprocess.Popen(cmd + ["--no-enable-prefix-caching"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    deadline = time.time() + 300
    import urllib.request

    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("vllm server exited: " + (proc.stdout.read() or "")[-2000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc, f"http://127.0.0.1:{port}/v1", ([name for name, _ in adapters] if adapters else str(model_dir))
        except OSError:
            time.sleep(2)
    raise RuntimeError("vllm server not ready in 300 s")


def _wait_ready(proc: subprocess.Popen, timeout: float) -> str:
    lines: list[str] = []
    box: dict = {}

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY "):
                box["url"] = line.split()[1]

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline and "url" not in box:
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    if "url" not in box:
        stop(proc)
        raise RuntimeError("endpoint did not start: " + "".join(lines[-30:]))
    return box["url"]


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a server we started and everything in its session, so the next system gets a quiet
    machine (without this, vLLM's model process kept a core busy for seconds after its server went)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    def alive() -> list[int]:
        return [pid for pid, _, _ in session_procs(proc.pid)]

    deadline = time.time() + grace_s
    while alive() and time.time() < deadline:
        time.sleep(0.5)
    for pid in alive():  # stragglers, by PID (only members of the session we started)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- main


def vllm_available() -> tuple[bool, str]:
    if not (VLLM_VENV / "bin/python").exists():
        return False, f"{VLLM_VENV} not found; build it with scripts/setup-vllm-cpu.sh"
    ok = subprocess.run([str(VLLM_VENV / "bin/python"), "-c", "import vllm"], capture_output=True, text=True)
    return (ok.returncode == 0, "vllm importable" if ok.returncode == 0 else ok.stderr[-400:])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="llama2-tiny, 8 prompts x 16 tokens, concurrency 1 and 8")
    ap.add_argument("--systems", default="hf_endpoint,hf_endpoint_accounted,hf_endpoint_adapters,sequential,continuous_batching,vllm_direct,"
                                         "vllm_direct_adapters,vllm_endpoint,vllm_endpoint_accounted,vllm_endpoint_adapters",
                    help="`*_accounted`: the endpoint with keys, limits and usage on; `*_adapters`: requests spread over 8 LoRA adapters")
    ap.add_argument("--concurrency", default=None, help="comma list; default 1,8,16,32 (quick: 1,8)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--output-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cap-s", type=float, default=None, help="stop starting requests after this many seconds per level")
    ap.add_argument("--cpu-partition", default="auto", help="our endpoints' Ray: as `platformctl up --cpu-partition` (auto, off, front CPUs)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve.json"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llmp-bench-models"))
    args = ap.parse_args(argv)
    quick = args.quick
    levels = [int(c) for c in (args.concurrency or ("1,8" if quick else "1,8,16,32")).split(",")]
    n_prompts = args.prompts or (8 if quick else 64)
    p_tokens = args.prompt_tokens or (16 if quick else 64)
    o_tokens = args.output_tokens or (16 if quick else 128)
    cap = args.cap_s or (60.0 if quick else 45.0)
    systems = args.systems.split(",")
    from llmplatform import cpus

    partition = cpus.plan(args.cpu_partition, os.sched_getaffinity(0), cpus.gpu_present())

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))  # 1: OpenMP threads contend badly on 2 shared cores
    model_dir = bench_model(Path(args.cache), quick)
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    prompts = make_prompts(vocab, n_prompts, p_tokens)
    result = {"workload": {"model": "llama2-tiny-random" if quick else "llama2-serve-bench (random init, bf16)", "model_dir": str(model_dir),
                           "prompts": n_prompts, "prompt_tokens": p_tokens, "output_tokens": o_tokens, "greedy": True, "ignore_eos": True,
                           "concurrency": levels, "rounds": args.rounds, "cap_s_per_level": cap},
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "endpoint_cpu_partition": partition.to_dict() if partition else None},
              "systems": {}, "rounds_tok_per_s": {}, "skipped": {}}
    have_vllm, why = vllm_available()
    for s in ("vllm_direct", "vllm_direct_adapters", "vllm_endpoint", "vllm_endpoint_accounted", "vllm_endpoint_adapters"):
        if s in systems and not have_vllm:
            result["skipped"][s] = why
    runs: dict[str, dict[int, list[dict]]] = {}
    hf_model = None
    adapters = bench_adapters(model_dir, Path(args.cache)) if any(s.endswith("_adapters") for s in systems) else None
    if adapters:
        result["workload"]["adapters"] = {"count": len(adapters), "rank": ADAPTER_RANK, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                          # whose CPU LoRA ops run (serving/engines/vllm_lora_cpu.py): the endpoint's engine sets ours
                                          "cpu_lora_ops": {"vllm_endpoint_adapters": os.environ.get("PLATFORM_VLLM_LORA_OPS") or "platform",
                                                           "vllm_direct_adapters": "vllm"}}
    for rnd in range(args.rounds):
        for system in systems:
            if system in result["skipped"]:
                continue
            proc = None
            try:
                mine = adapters if system.endswith("_adapters") else None
                if system in ("hf_endpoint", "hf_endpoint_accounted", "hf_endpoint_adapters"):
                    proc, url, name = start_endpoint(model_dir, "hf", sys.executable, partition, system.endswith("_accounted"), mine)
                elif system in ("vllm_endpoint", "vllm_endpoint_accounted", "vllm_endpoint_adapters"):
                    proc, url, name = start_endpoint(model_dir, "vllm", str(VLLM_VENV / "bin/python"), partition, system.endswith("_accounted"), mine)
                elif system in ("vllm_direct", "vllm_direct_adapters"):
                    proc, url, name = start_vllm_direct(model_dir, mine)
                elif hf_model is None:
                    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
                for c in levels:
                    if system.startswith(("hf_endpoint", "vllm_endpoint", "vllm_direct")):
                        run_http(url, name, prompts[: max(4, len(name) if isinstance(name, list) else 0)], min(c, 4), 4, 30)  # warm-up (every adapter loaded)
                        before = session_cpu(proc.pid)
                        res = with_cpu(run_http(url, name, prompts, c, o_tokens, cap), before, session_cpu(proc.pid))
                    elif system == "sequential":
                        res = run_sequential(hf_model, prompts, c, o_tokens, cap)
                    elif system == "continuous_batching":
                        res = run_continuous_batching(hf_model, prompts, c, o_tokens, cap)
                    else:
                        raise ValueError(f"unknown system {system}")
                    runs.setdefault(system, {}).setdefault(c, []).append(res)
                    print(f"round {rnd} {system:20s} c={c:<3d} {res}", flush=True)
            except Exception as exc:  # one broken system must not sink the others
                result["skipped"][system] = f"failed: {type(exc).__name__}: {str(exc)[-600:]}"
                print(f"{system} failed: {exc}", flush=True)
            finally:
                if proc is not None:
                    stop(proc)
    for system, by_c in runs.items():
        result["systems"][system] = {str(c): {k: round(statistics.median([r[k] for r in rs if r[k] is not None] or [0]), 3)
                                              for k in rs[0]} for c, rs in by_c.items()}
        result["rounds_tok_per_s"][system] = {str(c): [r["tok_per_s"] for r in rs] for c, rs in by_c.items()}
    result["targets"] = targets(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))
    return result


def targets(result: dict) -> dict:
    sysd = result["systems"]

    def tps(system, c):
        return (sysd.get(system, {}).get(str(c)) or {}).get("tok_per_s")

    c = 16 if 16 in result["workload"]["concurrency"] else max(result["workload"]["concurrency"])
    out = {"concurrency": c}
    hf, seq = tps("hf_endpoint", c), tps("sequential", c)
    out["hf_vs_sequential"] = round(hf / seq, 2) if hf and seq else None
    out["hf_vs_sequential_target"] = 4.0
    vd, ve = tps("vllm_direct", c), tps("vllm_endpoint", c)
    out["vllm_endpoint_vs_direct"] = round(ve / vd, 3) if vd and ve else None
    out["vllm_endpoint_vs_direct_target"] = 0.9
    for engine in ("hf", "vllm"):  # the cost of keys, limits and usage: same engine, same run, accounting on / off
        on, off = tps(f"{engine}_endpoint_accounted", c), tps(f"{engine}_endpoint", c)
        out[f"{engine}_accounting_vs_plain"] = round(on / off, 3) if on and off else None
    out["accounting_vs_plain_target"] = 0.97
    for engine, system in (("hf", "hf_endpoint"), ("vllm", "vllm_endpoint"), ("vllm_direct", "vllm_direct")):  # 16 streams over 8 adapters / base
        on, off = tps(f"{system}_adapters", c), tps(system, c)
        out[f"{engine}_adapters_vs_base"] = round(on / off, 3) if on and off else None
    out["vllm_adapters_vs_base_target"] = 0.8  # and >= vllm_direct_adapters_vs_base, vLLM's own multi-LoRA in the same run
    for system in ("vllm_direct", "vllm_endpoint"):  # CPU the serving layer spends per output token, beside the model's
        out[f"{system}_serving_cpu_ms_per_token"] = (sysd.get(system, {}).get(str(c)) or {}).get("serving_cpu_ms_per_token")
    return out


if __name__ == "__main__":
    main()
