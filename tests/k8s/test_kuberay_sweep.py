"""A sweep FineTuneJob end to end through the operator and KubeRay played locally (kuberay_jobs.py).

The operator resolves both trials of a `sweep:` section and builds one RayJob running the sweep
driver; the harness runs it on a local Ray cluster shaped like it (pods' env from kmock). Two
learning rates of llama2-tiny train on Ray Tune; the driver creates the parent MLflow run itself
(nobody did before the job), one child per trial, registers only the best trial's adapter, and the
operator writes that version to the FineTuneJob's status.
"""

from __future__ import annotations

import pytest

from llmplatform.kube import KubeApi, connect

from k8s_harness import eventually
from kuberay_jobs import KUBERAY_NAMESPACES

pytestmark = pytest.mark.e2e
NS = KUBERAY_NAMESPACES[0]
MODEL = "k8s-e2e-sweep"
KMOCK_KEEP_REQUESTS = 200


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    from llmplatform.tiny.tasks import write_task_dataset

    return write_task_dataset("reverse", tmp_path_factory.mktemp("sweepdata"), n_train=120, n_eval=16, seed=0)


@pytest.fixture()
def api(cluster, operator_mlflow, rayjobs) -> KubeApi:
    from llmplatform import paths
    from llmplatform.tiny import ensure_tiny_model

    ensure_tiny_model("base", paths.model_cache())
    return connect(host=cluster.url)


def test_a_sweep_finetunejob_trains_every_trial_and_registers_only_the_best(api, rayjobs, dataset, mlflow_server) -> None:
    from mlflow import MlflowClient

    from llmplatform.backends.k8s import finetune_job_cr
    from llmplatform.specs import parse_spec

    spec = parse_spec("finetune", {
        "name": "tiny-sweep", "base_model": "llama2-tiny", "method": "lora",
        "data": {"train": str(dataset["train"]), "validation": str(dataset["eval"]), "max_seq_length": 64},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": {"max_steps": 4, "micro_batch_size": 8, "warmup_ratio": 0.0},
        "resources": {"workers": 1, "cpus_per_worker": 1}, "eval": {"every_n_steps": 2}, "checkpoint": {"every_n_steps": 2},
        "mlflow": {"experiment": "k8s-e2e-sweep", "registered_model_name": MODEL},
        "sweep": {"params": {"hyperparameters.learning_rate": [1e-5, 3e-3]}, "max_concurrent": 1}})
    api.create(finetune_job_cr(spec, NS))
    run = rayjobs.run_for("tiny-sweep", NS)
    st = eventually(lambda: (s := (api.get("FineTuneJob", NS, "tiny-sweep") or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed") and s,
                    timeout=600, what="sweep finished")
    logs = run.logs() if run.cluster else run.error
    assert st["phase"] == "Succeeded", f"{st}\n--- Ray job log ---\n{(logs or '')[-4000:]}"
    st = eventually(lambda: (s := api.get("FineTuneJob", NS, "tiny-sweep")["status"]).get("registeredVersion") and s, timeout=60,
                    what="registered version in status")
    client = MlflowClient(mlflow_server)
    parent = client.get_run(st["mlflowRunId"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.trials"] == "2"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    best = parent.data.tags["sweep.best_run_id"]
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert [(v.run_id, v.version) for v in versions] == [(best, st["registeredVersion"])]  # only the best trial's adapter
