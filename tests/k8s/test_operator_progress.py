"""The operator's MLflow progress lookup (`llmoperator.__main__.mlflow_job_progress`) against a
real MLflow store (SQLite, no server): a resubmitted FineTuneJob (same name and spec, so the same
`platform.job_id`) logs into a new run, and the status must follow that newest run."""

from __future__ import annotations

import time

from llmplatform.backends.k8s import finetune_job_cr
from llmplatform.specs import parse_spec

from llmoperator.__main__ import mlflow_job_progress
from llmoperator.reconcile.finetune import job_id


def test_progress_follows_the_newest_run_of_a_resubmitted_job(tmp_path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec("finetune", {"name": "support-lora", "base_model": "llama2-7b", "data": {"train": "s3://data/support.jsonl"},
                                   "hyperparameters": {"max_steps": 100}, "mlflow": {"tracking_uri": uri, "experiment": "ft"}})
    first, again = finetune_job_cr(spec, "team-a"), finetune_job_cr(spec, "team-a")
    first["metadata"]["uid"], again["metadata"]["uid"] = "uid-1", "uid-2"
    assert mlflow_job_progress(first) is None  # no experiment yet

    client = MlflowClient(uri)
    exp = client.create_experiment("ft")
    old = client.create_run(exp, run_name=job_id(first), tags={"platform.job_id": job_id(first)})
    for step in (10, 20, 30):
        client.log_metric(old.info.run_id, "loss", 1.0 / step, step=step)
    client.set_terminated(old.info.run_id, "FAILED")  # its cluster died at step 30
    time.sleep(0.01)  # start_time is in ms
    new = client.create_run(exp, run_name=job_id(again), tags={"platform.job_id": job_id(again)})
    client.log_metric(new.info.run_id, "loss", 0.02, step=40)  # resumed from the step-30 checkpoint
    other = client.create_run(exp, tags={"platform.job_id": "support-lora-ffffffff"})  # another spec: another job
    client.log_metric(other.info.run_id, "loss", 0.5, step=90)

    assert mlflow_job_progress(again) == {"mlflowRunId": new.info.run_id, "progress": "40/100 steps (40%)"}


def test_a_finished_run_reports_the_version_it_registered(tmp_path) -> None:
    """Once the run has FINISHED, the lookup names the registry version created from that run
    (what `FineTuneJob.status.registeredVersion` and `finetune submit --follow` show)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec("finetune", {"name": "support-lora", "base_model": "llama2-7b", "data": {"train": "s3://data/support.jsonl"},
                                   "hyperparameters": {"max_steps": 40}, "mlflow": {"tracking_uri": uri, "experiment": "ft"}})
    cr = finetune_job_cr(spec, "team-a")
    client = MlflowClient(uri)
    exp = client.create_experiment("ft")
    run = client.create_run(exp, run_name=job_id(cr), tags={"platform.job_id": job_id(cr)})
    client.log_metric(run.info.run_id, "loss", 0.1, step=40)
    client.create_registered_model("support-bot")
    earlier = client.create_run(exp, tags={"platform.job_id": "someone-else"})
    client.create_model_version("support-bot", f"runs:/{earlier.info.run_id}/adapter", run_id=earlier.info.run_id)  # version 1: not ours
    client.create_model_version("support-bot", f"runs:/{run.info.run_id}/adapter", run_id=run.info.run_id)  # version 2
    assert "registeredVersion" not in mlflow_job_progress(cr)  # still running: no version claimed yet

    client.set_terminated(run.info.run_id, "FINISHED")
    found = mlflow_job_progress(cr)
    assert found == {"mlflowRunId": run.info.run_id, "progress": "40/40 steps (100%)", "registeredModel": "support-bot", "registeredVersion": "2"}
