"""EvaluationJob end to end through the operator and KubeRay played locally (kuberay_jobs.py).

The real operator (MLflow results lookup) turns the EvaluationJob into a RayJob; the harness
starts a local Ray cluster shaped like it (a head offering no CPUs, one worker pod) with the pods'
env (MLFLOW_TRACKING_URI from the Secret in kmock), submits the entrypoint with its entrypoint
resources and writes KubeRay's status back. llama2-tiny answers the reverse task's held-out
questions; the EvaluationJob ends Succeeded with its MLflow run and score in status.results.
"""

from __future__ import annotations

import pytest

from llmplatform.kube import KubeApi, connect

from k8s_harness import eventually
from kuberay_jobs import KUBERAY_NAMESPACES

pytestmark = pytest.mark.e2e
NS = KUBERAY_NAMESPACES[0]
KMOCK_KEEP_REQUESTS = 200


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    from llmplatform.tiny.tasks import write_task_dataset

    return write_task_dataset("reverse", tmp_path_factory.mktemp("evaldata"), n_train=10, n_eval=8, seed=0)


@pytest.fixture()
def api(cluster, operator_mlflow, rayjobs) -> KubeApi:
    from llmplatform import paths
    from llmplatform.tiny import ensure_tiny_model

    ensure_tiny_model("base", paths.model_cache())  # what the image would bake in
    return connect(host=cluster.url)


def test_evaluationjob_scores_llama2_tiny_and_reports_its_run(api, rayjobs, dataset, mlflow_server, manifest_validator) -> None:
    from mlflow import MlflowClient

    from llmplatform.backends.k8s import evaluation_job_cr
    from llmplatform.specs import parse_spec

    spec = parse_spec("eval", {"name": "tiny-eval", "models": ["llama2-tiny"], "dataset": {"name": "reverse", "path": str(dataset["eval"])},
                               "metrics": ["exact_match", "token_f1"], "generation": {"max_tokens": 8, "batch_size": 8},
                               "mlflow": {"experiment": "k8s-e2e-eval"}, "resources": {"cpus": 1, "memory_gb": 4}})
    api.create(evaluation_job_cr(spec, NS))
    run = rayjobs.run_for("tiny-eval", NS)
    st = eventually(lambda: (s := (api.get("EvaluationJob", NS, "tiny-eval") or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed") and s,
                    timeout=420, what="EvaluationJob finished")
    logs = run.logs() if run.cluster else run.error
    assert st["phase"] == "Succeeded", f"{st}\n--- Ray job log ---\n{(logs or '')[-4000:]}"
    manifest_validator.validate(api.get("RayJob", NS, "tiny-eval"))
    # the driver ran on the worker pod (the head offers no CPUs), with the pods' MLflow Secret
    assert run.cluster.head_env.env["MLFLOW_TRACKING_URI"] == mlflow_server
    st = eventually(lambda: (s := api.get("EvaluationJob", NS, "tiny-eval")["status"]).get("results") and s, timeout=60, what="results in status")
    [result] = st["results"]
    assert result["model"] == "llama2-tiny" and result["status"] == "FINISHED" and set(result["metrics"]) == {"exact_match", "token_f1"}
    mlrun = MlflowClient(mlflow_server).get_run(result["runId"])
    assert mlrun.data.tags["platform.job_id"] == st["jobId"] and mlrun.data.metrics["eval.reverse.exact_match"] == result["metrics"]["exact_match"]
    manifest_validator.validate(api.get("EvaluationJob", NS, "tiny-eval"))  # the status the operator wrote passes our CRD's schema
