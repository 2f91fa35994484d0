"""`platformctl finetune sweep` on the real local stack (Ray Tune over Ray Train, real MLflow):
three learning rates on the pretrained llama2-tiny, one hopeless (1e-6): the best by eval_loss is
registered and nothing else is, ASHA stops the hopeless trial before its last step, and MLflow
holds one parent run with a child per trial."""

from __future__ import annotations

import json

import pytest

from ftjobs import ctl, events, wait_until, write_spec

pytestmark = pytest.mark.integration


def test_sweep_registers_only_the_best_trial_and_asha_stops_a_bad_one(ctl_env, task_data, tmp_path, local_stack, tiny_base):
    from mlflow.tracking import MlflowClient
    spec = write_spec(tmp_path / "sweep.yaml", "rev-sweep", task_data["train"], task_data["eval"],
                      hyperparameters={"max_steps": 12, "micro_batch_size": 8}, checkpoint={"every_n_steps": 12},
                      resources={"workers": 1, "cpus_per_worker": 0.5},  # two trials at once on two cores
                      eval={"every_n_steps": 4, "max_batches": 1}, mlflow={"registered_model_name": "rev-sweep"})
    # the hopeless rate comes last, so the good ones have set the bar at ASHA's first rung when it gets there
    # (reduction factor 2: the cut is the rung's median, which the worst of three is below). Two good rates
    # train together, then the hopeless one alone: a third good rate only added a full trial beside it.
    proc = ctl(ctl_env, "finetune", "sweep", str(spec), "--param", "hyperparameters.learning_rate=2e-3,1e-3,1e-6",
               "--max-concurrent", "2", "--early-stop", "asha", "--output", "json", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    result, trials = out["result"], {t["trial"]: t for t in out["trials"]}
    assert out["job"]["state"] == "succeeded" and len(trials) == 3
    assert result["best_params"]["hyperparameters.learning_rate"] != 1e-6
    hopeless = trials[2]
    assert hopeless["state"] == "stopped" and hopeless["step"] < hopeless["total_steps"], trials

    client = MlflowClient(local_stack.mlflow_url)
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params["best.hyperparameters.learning_rate"]) == result["best_params"]["hyperparameters.learning_rate"]
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(result["value"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    assert {c.info.status for c in children if c.info.run_id != result["best_run_id"]} <= {"FINISHED", "KILLED"}
    versions = client.search_model_versions("name='rev-sweep'")
    assert [v.run_id for v in versions] == [result["best_run_id"]]  # only the best trial is registered
    assert _trial_actors(local_stack) == []  # no trial's workers outlive the sweep


def _trial_actors(stack) -> list:
    from ray.util.state import list_actors

    from llmplatform.backends.ray_auth import use_client_env

    use_client_env(stack.client_env)  # the stack's Ray token
    return [a for a in list_actors(address=stack.dashboard_url, filters=[("state", "=", "ALIVE")]) if a.class_name in ("RayTrainWorker", "TrainController")]


def test_cancelling_a_sweep_stops_every_trial_and_registers_nothing(ctl_env, task_data, tmp_path, local_stack, tiny_base):
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path / "cancel.yaml", "rev-sweep-cancel", task_data["train"], task_data["eval"],
                      hyperparameters={"max_steps": 5000, "micro_batch_size": 4}, checkpoint={"every_n_steps": 1000},
                      resources={"workers": 1, "cpus_per_worker": 0.5}, eval={"every_n_steps": 1000, "max_batches": 1},
                      mlflow={"registered_model_name": "rev-sweep-cancel"})
    out = json.loads(ctl(ctl_env, "finetune", "sweep", str(spec), "--param", "hyperparameters.learning_rate=1e-3,2e-3",
                         "--detach", "--output", "json", check=True).stdout)
    job = out["id"]
    wait_until(lambda: sum(e["kind"] == "step" for e in events(ctl_env, job)) >= 2, timeout=300, what="trials training")
    assert "cancelled" in ctl(ctl_env, "finetune", "cancel", job, check=True).stdout
    client = MlflowClient(local_stack.mlflow_url)
    parent = client.get_run(out["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "KILLED" and len(children) == 2
    wait_until(lambda: {c.info.status for c in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")} == {"KILLED"},
               timeout=60, what="the trials' runs to be KILLED")
    assert client.search_model_versions("name='rev-sweep-cancel'") == []

    wait_until(lambda: _trial_actors(local_stack) == [], timeout=60, what="no trial workers left")
