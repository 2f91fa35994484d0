"""Controlling running jobs on the real local stack: `finetune cancel` stops the workers, marks
the MLflow run KILLED and registers nothing; a worker process killed mid-run (max_failures=1)
is replaced and training resumes from the last checkpoint, so the step count continues.
These use the random-init tiny model: what is learnt does not matter here, only control."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from ftjobs import ctl, events, job_id_from, status, wait_until, write_spec

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _submit(env, spec) -> str:
    return job_id_from(ctl(env, "finetune", "submit", str(spec), check=True).stdout)


def test_cancel_stops_workers_kills_the_run_and_registers_nothing(ctl_env, task_data, tmp_path, local_stack):
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    spec = write_spec(tmp_path / "cancel.yaml", "rev-cancel", task_data["train"], base="llama2-tiny-random", resources={"workers": 2},
                      hyperparameters={"max_steps": 5000, "micro_batch_size": 4}, checkpoint={"every_n_steps": 1000},
                      eval={"every_n_steps": 1000}, mlflow={"registered_model_name": "rev-cancel"})
    job = _submit(ctl_env, spec)
    wait_until(lambda: status(ctl_env, job)["step"] >= 2, timeout=420, what="two training steps")
    pids = {e["pid"] for e in events(ctl_env, job) if e["kind"] == "worker_start"}
    assert len(pids) == 2 and all(_alive(p) for p in pids)

    out = ctl(ctl_env, "finetune", "cancel", job, check=True).stdout
    assert "cancelled" in out
    st = json.loads(ctl(ctl_env, "finetune", "status", job, "--output", "json", check=True).stdout)
    assert st["state"] == "cancelled" and st["reason"] == "cancelled by the user"
    client = MlflowClient(local_stack.mlflow_url)
    assert client.get_run(st["run_id"]).info.status == "KILLED"
    assert client.search_model_versions("name='rev-cancel'") == []
    wait_until(lambda: not any(_alive(p) for p in pids), timeout=60, every=1, what="worker processes to exit")
    leftover = [a for a in list_actors(address=local_stack.dashboard_url, filters=[("state", "=", "ALIVE")])
                if a.class_name in ("RayTrainWorker", "TrainController")]
    assert leftover == []
    assert "cancelled" in ctl(ctl_env, "finetune", "list", check=True).stdout
    again = ctl(ctl_env, "finetune", "cancel", job)
    assert again.returncode == 1 and "already ended" in again.stderr


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(ctl_env, task_data, tmp_path, local_stack):
    from mlflow.tracking import MlflowClient

    total, every = 200, 20
    spec = write_spec(tmp_path / "resume.yaml", "rev-resume", task_data["train"], base="llama2-tiny-random", resources={"workers": 1, "max_failures": 1},
                      hyperparameters={"max_steps": total, "micro_batch_size": 8}, checkpoint={"every_n_steps": every},
                      eval={"every_n_steps": every, "max_batches": 1})
    job = _submit(ctl_env, spec)
    snapshot = Path(local_stack.home) / "checkpoints" / job / "checkpoint_manager_snapshot.json"

    def registered_step():  # a checkpoint counts once Ray Train's controller has recorded it
        if not snapshot.is_file():
            return None
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        return latest and latest["metrics"]["step"]

    ckpt_step = wait_until(registered_step, timeout=420, every=0.5, what="the first registered checkpoint")
    assert status(ctl_env, job)["step"] < total, "the job finished before the kill; make it longer"
    [first] = [e for e in events(ctl_env, job) if e["kind"] == "worker_start" and e["rank"] == 0][:1]
    killed_at = time.time()
    os.kill(first["pid"], signal.SIGKILL)

    st = wait_until(lambda: (s := status(ctl_env, job))["state"] in ("succeeded", "failed", "cancelled") and s, timeout=420, what="the job to end")
    assert st["state"] == "succeeded", st["reason"]
    assert st["restarts"] == 1 and st["step"] == total
    log = events(ctl_env, job)
    starts = [e for e in log if e["kind"] == "worker_start" and e["rank"] == 0]
    resumed = next(e for e in starts if e["pid"] != first["pid"])
    assert resumed["resumed"] and resumed["step"] >= ckpt_step >= every and resumed["step"] % every == 0  # from a checkpoint, not step 0
    after = [e["step"] for e in log[log.index(resumed):] if e["kind"] == "step"]
    assert after[0] == resumed["step"] + 1 and after[-1] == total

    history = MlflowClient(local_stack.mlflow_url).get_metric_history(st["run_id"], "loss")
    late = sorted(m.step for m in history if m.timestamp / 1000 > killed_at)
    assert late and late[0] == resumed["step"] + 1 and late[-1] == total  # the curve continues, no step 1 again
    assert {m.step for m in history} == set(range(1, total + 1))
    # resource metrics are cumulative over the attempts: the resumed worker starts from the run's values
    for name in ("cpu_core_hours", "trained_tokens"):
        values = [m.value for m in sorted(MlflowClient(local_stack.mlflow_url).get_metric_history(st["run_id"], name), key=lambda m: m.timestamp)]
        assert values == sorted(values) and values[0] > 0, name
        before = [m.value for m in MlflowClient(local_stack.mlflow_url).get_metric_history(st["run_id"], name) if m.timestamp / 1000 <= killed_at]
        assert before and values[-1] > max(before), name
    assert st["metrics"]["gpu_hours"] == 0
