"""`make demo`: the whole platform on one machine, end to end, through the real commands.

Starts the embedded stack, builds `llama2-tiny`, writes a synthetic task with a held-out split,
validates it, fine-tunes a LoRA adapter on 2 Ray workers (live progress), registers it, promotes
it to `production` behind a gate, deploys it on Ray Serve, asks the held-out questions through
the `openai` SDK for the base and the fine-tuned model, and prints both accuracies side by side
with the MLflow UI and endpoint URLs. It leaves the stack running and says how to stop it; a
second run reuses the stack, the model cache and the registered adapter (`--retrain` forces a
new fine-tune). Each step prints the `platformctl` command it runs, so the demo is also a tour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmplatform.errors import PlatformError

REPO = Path(__file__).resolve().parents[2]
FINETUNE_SPEC = REPO / "jobs/demo/finetune-tiny.yaml"
SERVE_SPEC = REPO / "jobs/demo/serve-tiny.yaml"
TASK = "reverse"
MODEL_NAME = "demo-reverse"  # registered model name in jobs/demo/finetune-tiny.yaml
GATE = "eval_loss<=1.0"


@dataclass
class DemoResult:
    """What the demo measured; the e2e test asserts on it."""

    base_accuracy: float = 0.0
    tuned_accuracy: float = 0.0
    questions: int = 0
    version: str | None = None
    reused_adapter: bool = False
    endpoint: str = ""
    mlflow_url: str = ""
    dashboard_url: str = ""
    timings: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)


def _step(title: str, command: str | None = None) -> None:
    print(f"\n==> {title}", flush=True)
    if command:
        print(f"    $ {command}", flush=True)


def _ctl(*args: str) -> None:
    """Run a platformctl command in-process; a non-zero exit stops the demo with its message."""
    from llmplatform.cli.main import main

    code = main(list(args))
    if code != 0:
        raise PlatformError(f"`platformctl {' '.join(args)}` exited with {code}; see the message above")


def _registered_production(tracking_uri: str) -> str | None:
    """The version holding `production` of the demo's model, if a previous run made one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(MODEL_NAME, "production").version)
    except MlflowException:
        return None


def _latest_job_version() -> str | None:
    from llmplatform.backends import records

    done = [r for r in records.list_records() if r.name == "demo-reverse-lora" and r.state == "succeeded" and r.version]
    return str(done[-1].version) if done else None


def held_out_questions(data_dir: Path, limit: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (data_dir / f"{TASK}-eval.jsonl").read_text().splitlines() if line.strip()]
    return [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in rows[:limit]]


def accuracy(base_url: str, model: str, qa: list[tuple[str, str]]) -> tuple[float, list[str]]:
    from llmplatform.serving.app import ask
    from llmplatform.training.evaluate import exact_match

    answers = ask(base_url, model, [q for q, _ in qa], max_tokens=24)
    hits = sum(exact_match(a, ref) for a, (_, ref) in zip(answers, qa))
    return hits / max(len(qa), 1), answers


def last_install_seconds(path: str | None) -> float | None:
    """What `make install` recorded about its last run (Makefile), if it did."""
    try:
        return float(Path(path).read_text().strip()) if path else None
    except (OSError, ValueError):
        return None


def run_demo(*, retrain: bool = False, questions: int = 100, ports: dict | None = None, serve_port: int | None = None,
             install_s: float | None = None) -> DemoResult:
    from llmplatform import stack
    from llmplatform.tiny import ensure_tiny_model
    from llmplatform.tiny.tasks import write_task_dataset

    result, t0 = DemoResult(), time.time()
    if install_s is not None:
        result.timings["last_install_s"] = install_s  # not in total_s: `make install` ran before this process
    os.chdir(REPO)  # the demo specs name their data relative to the repository

    _step("Start the embedded stack (Ray head + MLflow server on 127.0.0.1)", "platformctl up")
    t = time.time()
    info = stack.up(**(ports or {}), progress=lambda msg: print(f"    {msg}", flush=True))
    os.environ["MLFLOW_TRACKING_URI"] = info.mlflow_url
    result.timings["stack_s"] = round(time.time() - t, 1)
    result.mlflow_url, result.dashboard_url = info.mlflow_url, info.dashboard_url
    print(f"    MLflow UI: {info.mlflow_url}\n    Ray dashboard: {info.dashboard_url}")

    _step("Size the real thing: Llama 2 70B QLoRA on one A100-80GB", "platformctl plan --model llama2-70b --method qlora --gpu a100-80gb")
    _ctl("plan", "--model", "llama2-70b", "--method", "qlora", "--gpu", "a100-80gb")

    _step("Build llama2-tiny (Llama 2 architecture, SentencePiece BPE, pretrained briefly; cached)")
    t = time.time()
    base_dir = ensure_tiny_model("base", log=lambda msg: print(f"    {msg}", flush=True))  # pretraining progress on a first run
    result.timings["tiny_model_s"] = round(time.time() - t, 1)
    print(f"    {base_dir} ({result.timings['tiny_model_s']} s)")

    data_dir = REPO / ".demo" / "data"
    t = time.time()
    _step(f"Write the synthetic '{TASK}' task with a held-out split", None)
    paths = write_task_dataset(TASK, data_dir, n_train=3000, n_eval=200, seed=0)
    print(f"    train {paths['train'].relative_to(REPO)}  held-out {paths['eval'].relative_to(REPO)}")

    _step("Validate the data before any compute is allocated", f"platformctl data validate {FINETUNE_SPEC.relative_to(REPO)}")
    _ctl("data", "validate", str(FINETUNE_SPEC))
    result.timings["data_s"] = round(time.time() - t, 1)

    version = None if retrain else _registered_production(info.mlflow_url)
    if version:
        result.reused_adapter = True
        _step(f"Reuse the adapter already in production: {MODEL_NAME} version {version} (--retrain to fine-tune again)")
    else:
        _step("Fine-tune LoRA on 2 Ray Train workers, tracked in MLflow, registered on success",
              f"platformctl finetune submit {FINETUNE_SPEC.relative_to(REPO)} --follow")
        t = time.time()
        _ctl("finetune", "submit", str(FINETUNE_SPEC), "--follow")
        result.timings["finetune_s"] = round(time.time() - t, 1)
        version = _latest_job_version()
        if not version:
            raise PlatformError("the fine-tune succeeded but registered no version; see `platformctl finetune list`")
        t = time.time()
        _step(f"Promote version {version} to production behind a gate",
              f"platformctl models promote {MODEL_NAME} --version {version} --to production --require '{GATE}'")
        _ctl("models", "promote", MODEL_NAME, "--version", version, "--to", "production", "--require", GATE,
             "--reason", "make demo")
        result.timings["promote_s"] = round(time.time() - t, 1)
    result.version = version
    _ctl("models", "show", MODEL_NAME, "--version", version)

    _step("Deploy base + the production adapter on Ray Serve (OpenAI-compatible)", f"platformctl serve deploy {SERVE_SPEC.relative_to(REPO)}")
    t = time.time()
    if serve_port:
        os.environ["PLATFORM_SERVE_PORT"] = str(serve_port)
    _ctl("serve", "deploy", str(SERVE_SPEC))
    result.timings["deploy_s"] = round(time.time() - t, 1)
    from llmplatform.serving.app import status as serve_status

    result.endpoint = serve_status("demo")["url"].rstrip("/")  # .../v1

    qa = held_out_questions(data_dir, questions)
    _step(f"Ask {len(qa)} held-out questions through the openai SDK: base vs fine-tuned")
    t = time.time()
    result.base_accuracy, base_answers = accuracy(result.endpoint, "llama2-tiny", qa)
    result.tuned_accuracy, tuned_answers = accuracy(result.endpoint, f"{MODEL_NAME}@production", qa)
    result.timings["eval_s"] = round(time.time() - t, 1)
    result.questions = len(qa)
    result.samples = [{"question": q, "expected": ref, "base": b, "fine_tuned": f}
                      for (q, ref), b, f in list(zip(qa, base_answers, tuned_answers))[:3]]
    result.timings["total_s"] = round(time.time() - t0, 1)
    _print_summary(result)
    return result


def _print_summary(r: DemoResult) -> None:
    print("\n" + "=" * 72)
    print(f"Held-out exact match on '{TASK}' ({r.questions} questions the adapter never saw):")
    print(f"    base llama2-tiny                 {r.base_accuracy:6.1%}")
    print(f"    {MODEL_NAME}@production (v{r.version})    {r.tuned_accuracy:6.1%}")
    for s in r.samples:
        print(f"    Q: {s['question']!r}  expected {s['expected']!r}  base {s['base']!r}  fine-tuned {s['fine_tuned']!r}")
    print(f"\nMLflow UI:      {r.mlflow_url}")
    print(f"Ray dashboard:  {r.dashboard_url}")
    print(f"Endpoint:       {r.endpoint}  (model names: llama2-tiny, {MODEL_NAME}@production, demo)")
    print(f"Try:            .venv/bin/platformctl serve chat demo \"Reverse the letters: c a t\"")
    print(f"Timings (s):    {r.timings}")
    print("\nThe stack keeps running. Stop it with `make down` (or `.venv/bin/platformctl down`).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmplatform.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="fine-tune again even if production already holds an adapter")
    parser.add_argument("--questions", type=int, default=100, help="held-out questions to ask each model")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("--install-seconds-file", metavar="FILE",
                        help="where `make install` wrote how long it took; reported as timings.last_install_s")
    parser.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port of the local stack")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard / Jobs API port")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port")
    parser.add_argument("--serve-port", type=int, default=None, help="Ray Serve HTTP port (default: $PLATFORM_SERVE_PORT or 8000)")
    args = parser.parse_args(argv)
    ports = {"ray_port": args.ray_port, "dashboard_port": args.dashboard_port, "mlflow_port": args.mlflow_port}
    try:
        result = run_demo(retrain=args.retrain, questions=args.questions, ports=ports, serve_port=args.serve_port,
                          install_s=last_install_seconds(args.install_seconds_file))
    except PlatformError as exc:
        print(f"\ndemo stopped: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
