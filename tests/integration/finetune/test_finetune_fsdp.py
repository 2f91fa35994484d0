"""FSDP on this CPU: `platformctl finetune submit --follow` runs a 2-worker LoRA job with
`resources.strategy: fsdp` (FSDP2 over gloo) on llama2-tiny against the session's real local
stack. The job succeeds, its loss falls, and the registered adapter (gathered from the shards)
loads with `PeftModel.from_pretrained`, differs from its initialisation and reproduces the eval
loss the sharded model reported. A 2-worker QLoRA job (DDP) runs and registers a loadable adapter
too. Resume of a sharded checkpoint is checked in tests/unit/training/test_sharding.py."""

from __future__ import annotations

import json
import math
import time

import pytest

from ftjobs import ctl, events, job_id_from, start, write_spec

pytestmark = pytest.mark.integration

STEPS, EVERY = 24, 8  # enough for the loss to fall clearly; the job took 77-107 s from submit to registered here


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, ctl_env, task_data, base_name) -> dict[str, tuple[str, str, float]]:
    """The FSDP LoRA job and a short 2-worker QLoRA (DDP) job, submitted together with --follow:
    name -> (job id, stdout, seconds from submit to registered)."""
    d = tmp_path_factory.mktemp("fsdp")
    common = dict(validation=task_data["eval"], base=base_name, lora={"modules_to_save": ["lm_head", "embed_tokens"]})
    specs = {
        "fsdp": write_spec(d / "fsdp.yaml", "rev-fsdp", task_data["train"], **common, resources={"workers": 2, "strategy": "fsdp"},
                           hyperparameters={"max_steps": STEPS, "micro_batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 3e-3},
                           checkpoint={"every_n_steps": EVERY}, eval={"every_n_steps": EVERY, "max_batches": 2},
                           mlflow={"registered_model_name": "rev-fsdp"}),
        "qlora": write_spec(d / "qlora.yaml", "rev-qlora-ddp", task_data["train"], **common, method="qlora", resources={"workers": 2},
                            hyperparameters={"max_steps": 4, "micro_batch_size": 8, "learning_rate": 3e-3},
                            checkpoint={"every_n_steps": 2}, eval={"every_n_steps": 2, "max_batches": 1},
                            mlflow={"registered_model_name": "rev-qlora-ddp"}),
    }
    t0 = time.monotonic()
    procs = {name: start(ctl_env, "finetune", "submit", str(path), "--follow") for name, path in specs.items()}
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        done[name] = (proc.returncode, stdout, stderr, time.monotonic() - t0)
    for name, (rc, stdout, stderr, _) in done.items():
        assert rc == 0, f"{name}: " + stdout[-3000:] + stderr[-3000:]
    return {name: (job_id_from(stdout), stdout, seconds) for name, (_, stdout, _, seconds) in done.items()}


def _registered_adapter(local_stack, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(local_stack.mlflow_url, registry_uri=local_stack.mlflow_url)
    mv = client.get_model_version(name, "1")
    run_id, path = mv.source.removeprefix("runs:/").split("/", 1)
    return client.download_artifacts(run_id, path)


def _events(env, job: str) -> list[dict]:
    """The job's progress events once each (Ray's job log carried every worker line twice here)."""
    unique = dict.fromkeys(json.dumps(e, sort_keys=True) for e in events(env, job))
    return [json.loads(e) for e in unique]


def test_fsdp_job_succeeds_and_its_loss_falls(jobs, ctl_env):
    job, stdout, seconds = jobs["fsdp"]
    assert f"{STEPS}/{STEPS}" in stdout and ": succeeded" in stdout
    assert "registered" in stdout and "models:/rev-fsdp/1" in stdout
    log = _events(ctl_env, job)
    assert sorted(e["rank"] for e in log if e["kind"] == "worker_start") == [0, 1]
    steps = [e for e in log if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert [e["step"] for e in log if e["kind"] == "checkpoint"] == list(range(EVERY, STEPS + 1, EVERY))
    evals = [e["eval_loss"] for e in steps if "eval_loss" in e]
    first, last = sum(e["loss"] for e in steps[:3]) / 3, sum(e["loss"] for e in steps[-3:]) / 3
    print(f"fsdp job: {STEPS} steps in {seconds:.0f} s (submit to registered); train loss {first:.3f} -> {last:.3f}; eval loss {evals}")
    assert last < 0.8 * first and evals[-1] < evals[0]
    assert all(math.isfinite(e["grad_norm"]) and e["grad_norm"] > 0 for e in steps)


def test_registered_fsdp_adapter_loads_and_holds_the_trained_weights(jobs, ctl_env, local_stack, tiny_base, task_data):
    """The adapter gathered from the shards is the model that was trained: loaded into a plain
    (unsharded) PeftModel it gives the final eval loss the sharded job reported."""
    import torch
    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from llmplatform.specs import parse_spec
    from llmplatform.training import batches, loop
    from llmplatform.training.evaluate import load_model
    from llmplatform.training.model_setup import load_tokenizer

    job, _, _ = jobs["fsdp"]
    adapter = _registered_adapter(local_stack, "rev-fsdp")
    tuned, base = load_model(tiny_base, adapter), load_model(tiny_base)
    assert isinstance(tuned, PeftModel)
    params = dict(tuned.named_parameters())
    lora_b = [p for n, p in params.items() if "lora_B" in n]
    assert len(lora_b) == 28 and all(float(p.abs().max()) > 0 for p in lora_b)  # lora_B starts at zero
    saved_head = next(p for n, p in params.items() if "lm_head.modules_to_save" in n)
    assert not torch.equal(saved_head, base.lm_head.weight)

    final = next(e for e in reversed(_events(ctl_env, job)) if e["kind"] == "step")
    spec = parse_spec("finetune", {"name": "x", "base_model": str(tiny_base),
                                   "data": {"train": str(task_data["train"]), "validation": str(task_data["eval"]), "max_seq_length": 64}})
    tok = load_tokenizer(tiny_base)
    val = batches.tokenized_examples(spec, tok, "validation")
    loss_sum = count = 0.0
    with torch.no_grad():
        for rank in (0, 1):  # the batches each of the 2 ranks evaluated (micro_batch 8, max_batches 2)
            for idx in batches.eval_batches(len(val), 2, rank, 8, 2):
                batch = batches.make_batch(val, idx, tok.pad_token_id, torch.device("cpu"))
                l, _, n = loop.token_loss(loop.forward(tuned, batch, None, "cpu"), batch["labels"])
                loss_sum, count = loss_sum + float(l), count + float(n)
    assert loss_sum / count == pytest.approx(final["eval_loss"], rel=1e-4)
    status = json.loads(ctl(ctl_env, "finetune", "status", job, "--output", "json", check=True).stdout)
    run = MlflowClient(local_stack.mlflow_url).get_run(status["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["resources.strategy"] == "fsdp"


def test_two_worker_qlora_job_registers_an_adapter_that_loads(jobs, ctl_env, local_stack, tiny_base):
    from peft import PeftModel

    from llmplatform.training.evaluate import load_model

    job, stdout, seconds = jobs["qlora"]
    assert "4/4" in stdout and ": succeeded" in stdout and "models:/rev-qlora-ddp/1" in stdout
    log = _events(ctl_env, job)
    assert sorted(e["rank"] for e in log if e["kind"] == "worker_start") == [0, 1]
    assert [e["step"] for e in log if e["kind"] == "checkpoint"] == [2, 4]
    tuned = load_model(tiny_base, _registered_adapter(local_stack, "rev-qlora-ddp"))
    assert isinstance(tuned, PeftModel)
    assert all(float(p.abs().max()) > 0 for n, p in tuned.named_parameters() if "lora_B" in n)
    print(f"qlora (2 workers, ddp) job: 4 steps, done {seconds:.0f} s after submit")
