"""DPO end to end on this CPU: `platformctl finetune submit --follow` runs `objective: dpo` LoRA
jobs on llama2-tiny (2 Ray Train workers, DDP; and QLoRA on one) against the session's real
local stack, on a synthetic preference task (the same correct answer, polite = chosen, curt =
rejected). Before tuning the policy equals the reference, so it prefers neither answer of any
held-out pair; the registered adapter's implicit reward prefers the polite one on >= 90% of
them, the MLflow run has TRL's reward metrics per step, and the adapter loads in the serving
engine like any other and keeps that preference there."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from ftjobs import start, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# Measured in-process (2026-12-05, 1 thread, 400 pairs, micro-batch 16, lr 1e-3, beta 0.1):
# held-out accuracy 1.0 from step 5 on, margin 5.6 at step 20.
STEPS = 12
N_TRAIN, N_EVAL = 256, 64
BETA = 0.1


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    from llmplatform.tiny.preference import write_preference_task

    return write_preference_task(tmp_path_factory.mktemp("polite"), n_train=N_TRAIN, n_eval=N_EVAL, seed=0)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, ctl_env, pref_data, base_name):
    """LoRA (2 workers, DDP) and QLoRA (1 worker) DPO jobs submitted with --follow at once."""
    d = tmp_path_factory.mktemp("dpo-specs")
    common = dict(validation=pref_data["eval"], base=base_name, objective="dpo", dpo={"beta": BETA, "loss_type": "sigmoid"},
                  lora={"rank": 8, "alpha": 16}, checkpoint={"every_n_steps": STEPS}, eval={"every_n_steps": STEPS // 2, "max_batches": 4})
    specs = {
        "lora": write_spec(d / "lora.yaml", "pref-lora", pref_data["train"], **common, resources={"workers": 2},
                           hyperparameters={"max_steps": STEPS, "micro_batch_size": 8, "learning_rate": 1e-3, "warmup_ratio": 0.1},
                           mlflow={"registered_model_name": "pref-lora"}),
        "qlora": write_spec(d / "qlora.yaml", "pref-qlora", pref_data["train"], **common, method="qlora",
                            hyperparameters={"max_steps": STEPS, "micro_batch_size": 16, "learning_rate": 1e-3, "warmup_ratio": 0.1},
                            mlflow={"registered_model_name": "pref-qlora"}),
    }
    started = time.perf_counter()
    procs = {name: start(ctl_env, "finetune", "submit", str(path), "--follow") for name, path in specs.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = (proc.returncode, stdout, stderr)
    print(f"both DPO jobs: {time.perf_counter() - started:.0f} s")
    return out


def _adapter(local_stack, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(local_stack.mlflow_url, registry_uri=local_stack.mlflow_url)
    mv = client.get_model_version(name, "1")
    run_id, path = mv.source.removeprefix("runs:/").split("/", 1)
    return client.download_artifacts(run_id, path)


def _eval_pairs(tiny_base, pref_data):
    from llmplatform.data.preference import load_preference_records, tokenize_pairs
    from llmplatform.training.model_setup import load_tokenizer

    tok = load_tokenizer(tiny_base)
    pairs = tokenize_pairs(load_preference_records(pref_data["eval"]), tok, 64)
    return tok, [{"chosen": p.chosen, "rejected": p.rejected} for p in pairs]


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_dpo_job_registers_an_adapter_that_prefers_the_chosen_style(jobs, name, local_stack, tiny_base, pref_data):
    from peft import PeftModel

    from llmplatform.training import dpo
    from llmplatform.training.evaluate import load_model

    rc, stdout, stderr = jobs[name]
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert f"{STEPS}/{STEPS}" in stdout and re.search(rf"registered\s+models:/pref-{name}/1", stdout)
    tok, pairs = _eval_pairs(tiny_base, pref_data)
    assert len(pairs) == N_EVAL
    from peft import LoraConfig, get_peft_model

    fresh = get_peft_model(load_model(tiny_base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))  # an untrained policy
    before = dpo.preference_accuracy(fresh, tok, pairs, BETA)
    after = dpo.preference_accuracy(load_model(tiny_base, _adapter(local_stack, f"pref-{name}")), tok, pairs, BETA)
    print(f"held-out preference accuracy ({name}, {STEPS} steps): before {before} -> after {after}")
    assert before["ties"] == 1.0 and before["margin"] == 0.0  # policy == reference: no preference, chance level
    assert after["accuracy"] >= 0.9 and after["margin"] > 0
    assert isinstance(load_model(tiny_base, _adapter(local_stack, f"pref-{name}")), PeftModel)


def test_the_run_logs_trl_reward_metrics_every_step(jobs, local_stack):
    from mlflow.tracking import MlflowClient

    assert jobs["lora"][0] == 0
    client = MlflowClient(local_stack.mlflow_url)
    run = client.get_run(client.get_model_version("pref-lora", "1").run_id)
    for metric in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == STEPS, metric
    m = run.data.metrics
    assert m["eval_rewards/accuracies"] >= 0.9 and m["eval_rewards/margins"] > 0 and m["eval_loss"] < 0.69  # below log 2: better than chance
    assert run.data.params["objective"] == "dpo" and run.data.params["dpo.beta"] == str(BETA)


def test_the_registered_adapter_serves_and_keeps_its_preference(jobs, local_stack, tiny_base, pref_data):
    from llmplatform.serving.engines import GenerationRequest
    from llmplatform.serving.engines.hf import HFEngine

    assert jobs["lora"][0] == 0
    tok, pairs = _eval_pairs(tiny_base, pref_data)
    engine = HFEngine(str(tiny_base), max_model_len=128, device="cpu")
    try:
        engine.load_adapter("pref-lora/1", _adapter(local_stack, "pref-lora"))
        rows = [(p[side]["input_ids"], p[side]["labels"]) for p in pairs for side in ("chosen", "rejected")]
        tuned, base = engine.mean_nll(rows, "pref-lora/1"), engine.mean_nll(rows)
        # the adapter lowers the polite answer's loss relative to the base more than the curt one's
        wins = sum((tuned[i] - base[i]) < (tuned[i + 1] - base[i + 1]) for i in range(0, len(rows), 2))
        assert wins / len(pairs) >= 0.9

        async def complete(adapter):
            chosen = pairs[0]["chosen"]
            prompt = chosen["input_ids"][: next(i for i, t in enumerate(chosen["labels"]) if t != -100)]
            req = GenerationRequest(prompt_ids=prompt, max_tokens=8, temperature=0.0, adapter_id=adapter)
            return [e async for e in engine.generate(req)]

        events = asyncio.run(asyncio.wait_for(complete("pref-lora/1"), 60))
        assert events and events[-1].get("finish_reason") in ("stop", "length")
    finally:
        engine.shutdown()
