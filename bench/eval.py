"""Evaluation throughput: the batched eval job vs a sequential transformers `generate` loop.

    .venv/bin/python bench/eval.py            # a few minutes on 2 cores; writes bench/results/eval.json
    .venv/bin/python bench/eval.py --quick    # CPU dry run, llama2-tiny-random, 8 examples (tests)

Same model (llama2-tiny, the pretrained tiny base), same held-out examples (128 of the `reverse`
task, prompts built as in training), same generation settings (greedy, `--max-tokens` new tokens,
stop at EOS), same torch threads, in the same process and run. Ours: the eval job's generate+score
path (`llmplatform.evaluation.runner.evaluate`, what `platformctl eval submit` runs before it
writes to MLflow: the `hf` engine with `--batch-size` sequences decoded together). Reference: one
`model.generate` call per example, one after another, scored with the same scorer. Both include
loading the model and building the prompts; a warm-up of 2 examples runs first for each. The
reference and ours alternate for `--rounds` rounds, with one more reference run at the end, and
the medians are compared, since load on a shared machine drifts. Target: ours >= 4x examples/s at 16-way batching. `answers_agree` is the
share of examples where both produced the same text (greedy on both: it should be ~1; fp32
batching with padding can flip a near-tie). Results: bench/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

TARGET = 4.0


def make_spec(data: Path, model: str, args):
    from llmplatform.specs import parse_spec

    return parse_spec("eval", {"name": "bench-eval", "models": [model], "metrics": ["exact_match"],
                               "dataset": {"name": "reverse", "path": str(data), "limit": args.examples},
                               "generation": {"max_tokens": args.max_tokens, "batch_size": args.batch_size}})


def ours(spec) -> dict:
    """The eval job's path: resolve, engine, batched generation, scoring (no MLflow)."""
    from llmplatform.evaluation.runner import evaluate, resolve_models

    from llmplatform.evaluation.runner import _engine, load_examples

    warm = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"limit": 2})})
    evaluate(warm, resolve_models(warm, None))
    t0 = time.perf_counter()
    report = evaluate(spec, resolve_models(spec, None))
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()  # the fixed part of that wall time: engine start and prompt building, on their own
    engine = _engine(spec.models[0], spec)
    load_examples(spec, engine.tokenizer)
    load = time.perf_counter() - t0
    engine.shutdown()
    r = report.results[0]
    return {"examples": report.examples, "wall_s": round(wall, 2), "examples_per_s": round(report.examples / wall, 2),
            "load_s": round(load, 3), "examples_per_s_after_load": round(report.examples / max(wall - load, 1e-6), 2),
            "exact_match": round(r.means()["exact_match"], 4), "answers": r.answers}


def sequential(spec) -> dict:
    """One `model.generate` per example, greedy, the same max new tokens and threads as the job's engine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmplatform.basemodels import locate
    from llmplatform.evaluation import scorers
    from llmplatform.evaluation.runner import _engine_threads, load_examples

    def run(limit: int | None) -> tuple[float, list[str], list[float]]:
        t0 = time.perf_counter()
        model_dir = locate(spec.models[0])
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        examples = load_examples(spec, tok)[:limit]
        load = time.perf_counter() - t0
        answers, scores, new_tokens = [], [], 0
        with torch.no_grad():
            for ex in examples:
                ids = torch.tensor([ex.prompt_ids])  # [1, S]
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec.generation.max_tokens,
                                     do_sample=False, pad_token_id=tok.eos_token_id)
                new_tokens += out.shape[1] - ids.shape[1]
                answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
                scores.append(scorers.exact_match(answers[-1], ex.reference))
        return time.perf_counter() - t0, load, answers, scores, new_tokens

    torch.set_num_threads(_engine_threads())
    run(2)  # warm-up
    wall, load, answers, scores, new_tokens = run(None)
    return {"examples": len(answers), "wall_s": round(wall, 2), "examples_per_s": round(len(answers) / wall, 2),
            "load_s": round(load, 3), "examples_per_s_after_load": round(len(answers) / max(wall - load, 1e-6), 2),
            "new_tokens_per_answer": round(new_tokens / len(answers), 1),
            "exact_match": round(sum(scores) / len(scores), 4), "answers": answers}


def markdown(result: dict) -> str:
    o, s = result["ours"], result["sequential"]
    w, a = result["workload"], result["after_load"]
    return "\n".join([
        "## Evaluation (`bench/eval.py`)",
        "",
        f"Measured {result['date']} on {result['machine']}; {w['model']}, {w['examples']} held-out `reverse` examples,",
        f"greedy, at most {w['max_tokens']} new tokens, {w['threads']} torch thread(s); wall time includes model load and prompt building;",
        f"medians of {result['rounds']} job runs and {result['rounds'] + 1} sequential runs, alternating.",
        "",
        "| system | examples/s | wall s | exact_match | ratio | target |",
        "|---|---|---|---|---|---|",
        f"| eval job (`hf` engine, batch {w['batch_size']}) | {o['examples_per_s']} | {o['wall_s']} | {o['exact_match']} | {result['ratio']:.2f}x | >= {TARGET:g}x |",
        f"| sequential transformers `generate` | {s['examples_per_s']} | {s['wall_s']} | {s['exact_match']} | 1.00x | |",
        f"| same, generate+score only (load excluded): job vs sequential | {a['ours_examples_per_s']} vs {a['sequential_examples_per_s']} | | | {a['ratio']:.2f}x | |",
        "",
        f"Answers identical on {result['answers_agree']:.0%} of the examples ({s['new_tokens_per_answer']} new tokens per answer on average;",
        "exact_match is the untuned base's, which has not learned the task). Reproduce: `.venv/bin/python bench/eval.py`.",
        "Raw numbers: `bench/results/eval.json`.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU dry run: llama2-tiny-random, 8 examples, 8 tokens, batch 4")
    parser.add_argument("--model", default="llama2-tiny", help="base model (basemodels.locate name)")
    parser.add_argument("--examples", type=int, default=128, help="held-out examples")
    parser.add_argument("--max-tokens", type=int, default=32, help="max new tokens per answer")
    parser.add_argument("--batch-size", type=int, default=16, help="the job's generation.batch_size")
    parser.add_argument("--rounds", type=int, default=5, help="alternating (sequential, job) rounds; medians reported")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.examples, args.max_tokens, args.batch_size, args.rounds = "llama2-tiny-random", 8, 8, 4, 1
    import platform as host

    import torch

    from llmplatform.evaluation.runner import _engine_threads
    from llmplatform.tiny.tasks import write_task_dataset

    with tempfile.TemporaryDirectory(prefix="evalb", dir="/tmp") as tmp:
        data = write_task_dataset("reverse", Path(tmp), n_train=0, n_eval=args.examples, seed=0)["eval"]
        spec = make_spec(data, args.model, args)
        seq_runs, job_runs = [], []
        for _ in range(args.rounds):
            seq_runs.append(sequential(spec))
            print("sequential", {k: v for k, v in seq_runs[-1].items() if k != "answers"}, flush=True)
            job_runs.append(ours(spec))
            print("eval job", {k: v for k, v in job_runs[-1].items() if k != "answers"}, flush=True)
        seq_runs.append(sequential(spec))
        print("sequential", {k: v for k, v in seq_runs[-1].items() if k != "answers"}, flush=True)
    job = sorted(job_runs, key=lambda r: r["examples_per_s"])[len(job_runs) // 2]
    seq_rate = statistics.median(r["examples_per_s"] for r in seq_runs)
    seq_after = statistics.median(r["examples_per_s_after_load"] for r in seq_runs)
    job_after = statistics.median(r["examples_per_s_after_load"] for r in job_runs)
    agree = sum(a.strip() == b.strip() for a, b in zip(job["answers"], seq_runs[0]["answers"])) / max(len(job["answers"]), 1)
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "quick": args.quick,
        "machine": f"{os.cpu_count()} CPU cores ({host.machine()}), torch {torch.__version__}",
        "workload": {"model": args.model, "task": "reverse", "examples": args.examples, "max_tokens": args.max_tokens,
                     "batch_size": args.batch_size, "threads": _engine_threads(), "greedy": True},
        "rounds": args.rounds,
        "ours": {**{k: v for k, v in job.items() if k != "answers"},
                 "runs": [{k: v for k, v in r.items() if k != "answers"} for r in job_runs]},
        "sequential": {"examples_per_s": round(seq_rate, 2), "wall_s": round(statistics.median(r["wall_s"] for r in seq_runs), 2),
                       "exact_match": seq_runs[0]["exact_match"], "new_tokens_per_answer": seq_runs[0]["new_tokens_per_answer"],
                       "runs": [{k: v for k, v in r.items() if k != "answers"} for r in seq_runs]},
        "ratio": round(job["examples_per_s"] / seq_rate, 2), "target": TARGET,
        "after_load": {"ours_examples_per_s": job_after, "sequential_examples_per_s": seq_after,
                       "ratio": round(job_after / seq_after, 2)},
        "answers_agree": round(agree, 4),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
