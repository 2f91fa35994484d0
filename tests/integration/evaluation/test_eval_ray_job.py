"""`platformctl eval submit --target ray` on the session's real local stack (Ray head + MLflow):
the same runner runs as a Ray job, its report comes back from the job log and is printed, and
`eval list` shows the job's record. A scorer that raises on every example fails the job."""

from __future__ import annotations

import json
import os
import textwrap
import uuid

import pytest

from llmplatform.cli.main import main

pytestmark = pytest.mark.integration
BASE = "llama2-tiny-random"


@pytest.fixture
def stack_env(local_stack, monkeypatch):
    from llmplatform import paths

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in {**local_stack.client_env, "PLATFORM_HOME": str(local_stack.home),
                       "PLATFORM_MODEL_CACHE": str(paths.model_cache())}.items():
        monkeypatch.setenv(key, value)
    return local_stack


def _spec(tmp_path, metrics) -> str:
    from llmplatform.tiny.tasks import write_task_dataset

    data = write_task_dataset("reverse", tmp_path / "data", n_train=8, n_eval=6)
    path = tmp_path / f"eval-{uuid.uuid4().hex[:4]}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: reverse-ray
        models: [{BASE}]
        dataset: {{name: reverse, path: {data['eval']}}}
        metrics: {json.dumps(metrics)}
        generation: {{max_tokens: 8, batch_size: 6}}
        mlflow: {{experiment: eval-ray-{uuid.uuid4().hex[:6]}}}
    """))
    return str(path)


def test_eval_submit_target_ray_runs_the_job_on_the_stack_and_lists_it(stack_env, tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    spec = _spec(tmp_path, ["exact_match", "token_f1"])
    assert main(["eval", "submit", spec, "--target", "ray", "--output", "json", "--timeout", "600"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    job_id = captured.err.split("evaluation job ")[1].split()[0]
    assert out["examples"] == 6 and [m["model"] for m in out["models"]] == [BASE]
    row = out["models"][0]
    run = MlflowClient(stack_env.mlflow_url).get_run(row["run_id"])  # written by the job, on the stack's MLflow
    assert run.data.metrics["eval.reverse.token_f1"] == pytest.approx(row["token_f1"], abs=1e-4)
    assert run.data.tags["eval.model"] == BASE

    assert main(["eval", "list", "--output", "json"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed[job_id]["state"] == "succeeded" and listed[job_id]["models"] == BASE
    assert listed[job_id]["report"]["models"][0]["run_id"] == row["run_id"]
    assert main(["finetune", "list", "--output", "json"]) == 0
    assert job_id not in capsys.readouterr().out  # eval jobs are not fine-tuning jobs

    # a scorer that raises on every example: the job fails, its report and the reason are printed
    bad = _spec(tmp_path, ["exact_match", "python:json:loads"])  # loads(prediction, reference) -> TypeError
    assert "RAY_ADDRESS" not in os.environ  # a submit leaves no RAY_ADDRESS behind (it sent later ray.init calls to this cluster)
    assert main(["eval", "submit", bad, "--target", "ray", "--timeout", "600"]) == 1
    captured = capsys.readouterr()
    assert "loads=6" in captured.out
    assert f"metric 'loads' raised on all 6 examples (first: line 1: TypeError" in captured.err
    assert "failed" in captured.err.split("error:")[1]
