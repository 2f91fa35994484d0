"""FineTuneJob end to end through the operator and KubeRay played locally (kuberay_jobs.py).

The real operator (MLflow registry and progress) turns each FineTuneJob into a RayJob; the
harness starts a local Ray cluster shaped like it, with the pods' env (the MLflow URI comes from
the Secret in kmock), submits the RayJob's entrypoint and writes KubeRay's status back. Flows
(issue 15): 1 trains llama2-tiny on CPU workers and registers the adapter; 4 deletes the CR and
finds no cluster, job or process left; 5 kills the cluster mid-run, resubmits the same
FineTuneJob and resumes from its checkpoint; and a GPU spec runs up to where CUDA is needed.
"""

from __future__ import annotations

import copy
import time

import pytest

from llmplatform.kube import KubeApi, connect
from llmoperator.reconcile.finetune import job_id

from k8s_harness import eventually
from kuberay_jobs import HF_TEST_TOKEN, KUBERAY_NAMESPACES

pytestmark = pytest.mark.e2e
NS = KUBERAY_NAMESPACES[0]
MODEL = "k8s-e2e-adapter"
KMOCK_KEEP_REQUESTS = 200  # minutes of polling: keep kmock fast (see conftest.cluster)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    from llmplatform.tiny.tasks import write_task_dataset

    return write_task_dataset("reverse", tmp_path_factory.mktemp("ftdata"), n_train=200, n_eval=20, seed=0)


@pytest.fixture(scope="module")
def tiny_base() -> None:
    """The pretrained llama2-tiny in the model cache the pods see (the image would bake it in)."""
    from llmplatform import paths
    from llmplatform.tiny import ensure_tiny_model

    ensure_tiny_model("base", paths.model_cache())


@pytest.fixture()
def api(cluster, operator_mlflow, rayjobs, tiny_base) -> KubeApi:
    return connect(host=cluster.url)


def ftj_cr(name: str, dataset: dict, **sections) -> dict:
    """A FineTuneJob for llama2-tiny: tiny steps, CPU workers, registered as MODEL."""
    from llmplatform.backends.k8s import finetune_job_cr
    from llmplatform.specs import parse_spec

    body = {"name": name, "base_model": "llama2-tiny", "method": "lora",
            "data": {"train": str(dataset["train"]), "max_seq_length": 64},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "hyperparameters": {"learning_rate": 2e-3, "max_steps": 4, "micro_batch_size": 8, "warmup_ratio": 0.0},
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "checkpoint": {"every_n_steps": 2, "metric": "loss"},
            "mlflow": {"experiment": "k8s-e2e", "registered_model_name": MODEL}}
    for key, value in sections.items():
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) else value
    return finetune_job_cr(parse_spec("finetune", body), NS)


def status_of(api: KubeApi, kind: str, name: str) -> dict:
    return (api.get(kind, NS, name) or {}).get("status") or {}


def finished(api: KubeApi, name: str):
    return lambda: status_of(api, "FineTuneJob", name) if status_of(api, "FineTuneJob", name).get("phase") in ("Succeeded", "Failed", "Cancelled") else None


def progress_events(logs: str | None) -> list[dict]:
    from llmplatform.backends.ray_jobs import parse_events

    return parse_events(logs or "")


def events_of(run, kind: str) -> list[dict]:
    try:
        return [e for e in progress_events(run.logs()) if e.get("kind") == kind]
    except (OSError, ValueError, AssertionError):
        return []


def all_dead(pids: list[int]) -> bool:
    from llmplatform.stack.processes import pid_alive

    return not any(pid_alive(p) for p in pids)


def test_finetunejob_trains_registers_and_deleting_it_leaves_nothing(api, rayjobs, dataset, mlflow_server, manifest_validator) -> None:
    """Flows 1 and 4: FineTuneJob -> RayJob -> real training -> MLflow run + registered adapter; delete -> nothing left."""
    from mlflow import MlflowClient

    name = "tiny-lora"
    api.create(ftj_cr(name, dataset))
    run = rayjobs.run_for(name, NS)
    st = eventually(finished(api, name), timeout=420, what="FineTuneJob finished")
    logs = run.logs() if run.cluster else run.error
    assert st["phase"] == "Succeeded", f"{st}\n--- Ray job log ---\n{(logs or '')[-4000:]}"

    # KubeRay's side, as the harness wrote it (schema-checked against KubeRay's CRD)
    rayjob = api.get("RayJob", NS, name)
    manifest_validator.validate(rayjob)
    rs = rayjob["status"]
    assert (rs["jobStatus"], rs["jobDeploymentStatus"], rs["jobId"], rs["rayClusterName"]) == ("SUCCEEDED", "Complete", run.job_id, run.cluster_name)
    assert [h for h in run.history if h.startswith(("Initializing", "Running"))][:2] == ["Initializing/", "Running/"]
    assert st["rayJobId"] == run.job_id and st["rayClusterName"] == run.cluster_name
    # the pods' env came from kmock: the MLflow Secret, PLATFORM_HOME in each pod's own home
    assert run.cluster.head_env.env["MLFLOW_TRACKING_URI"] == mlflow_server
    homes = {n.env.env["PLATFORM_HOME"] for n in run.cluster.nodes}
    assert len(homes) == len(run.cluster.nodes) == 2 and all(h.endswith("/home/.llm-platform") for h in homes)

    # MLflow: the run the status names trained 4 steps and its adapter is a registered version
    client = MlflowClient(mlflow_server)
    assert st.get("mlflowRunId"), st
    mlrun = client.get_run(st["mlflowRunId"])
    assert mlrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")][-1] == 4
    versions = [v for v in client.search_model_versions(f"name='{MODEL}'") if v.run_id == mlrun.info.run_id]
    assert len(versions) == 1, [(v.version, v.run_id) for v in client.search_model_versions(f"name='{MODEL}'")]
    result = [e for e in progress_events(logs) if e["kind"] == "result"]
    assert result and str(result[-1]["version"]) == versions[0].version
    conditions = {c["type"]: c["status"] for c in st["conditions"]}
    assert conditions == {"Running": "False", "Succeeded": "True", "Failed": "False"}, st["conditions"]  # kubectl wait --for=condition=Succeeded
    # the FineTuneJob's status names the version its run registered (the operator reads it from MLflow)
    st = eventually(lambda: (s := api.get("FineTuneJob", NS, name)["status"]).get("registeredVersion") and s, timeout=30, what="registered version in status")
    assert (st["registeredModel"], st["registeredVersion"]) == (MODEL, versions[0].version)

    # Flow 4: the finished cluster is still up (ttlSecondsAfterFinished); deleting the FineTuneJob removes everything
    pids = run.cluster.pids()
    assert pids and rayjobs.runs[run.uid].cluster.alive()
    t0 = time.monotonic()
    api.delete("FineTuneJob", NS, name)
    eventually(lambda: api.get("RayJob", NS, name) is None, timeout=30, what="RayJob garbage-collected")
    eventually(lambda: run.torn_down and all_dead(pids), timeout=60, what="every process of the cluster gone")
    eventually(lambda: api.get("RayCluster", NS, run.cluster_name) is None, timeout=30, what="RayCluster deleted")
    assert not run.cluster.alive() and not run.cluster.pids()
    print(f"deletion to no process: {time.monotonic() - t0:.1f}s")


def test_cluster_lost_midrun_then_resubmitted_resumes_from_checkpoint(api, rayjobs, dataset, tmp_path_factory) -> None:
    """Flow 5 (and 4 mid-run): kill the cluster after the first checkpoint -> ClusterLost; the same
    FineTuneJob again -> it resumes from that checkpoint; deleting it mid-run leaves nothing."""
    name = "tiny-resume"
    # Checkpoints on storage every pod and every cluster reach (an object-store bucket on a real cluster)
    store = tmp_path_factory.mktemp("shared-checkpoints")
    cr = ftj_cr(name, dataset, hyperparameters={"max_steps": 200}, checkpoint={"every_n_steps": 2, "storage_uri": str(store)})
    api.create(copy.deepcopy(cr))
    try:
        _lose_and_resume(api, rayjobs, name, cr, store)
    finally:  # whatever failed, no 200-step job keeps running for the next test
        api.delete("FineTuneJob", NS, name)


def _lose_and_resume(api: KubeApi, rayjobs, name: str, cr: dict, store) -> None:
    run = rayjobs.run_for(name, NS)
    first = eventually(lambda: events_of(run, "checkpoint"), timeout=420, what="first checkpoint reported")
    # Ray Train resumes from what its controller registered (the snapshot next to the checkpoints), not from a worker's report
    eventually(lambda: list(store.glob("*/checkpoint_manager_snapshot.json")), timeout=60, what="checkpoint registered by Ray Train")
    pids = run.cluster.pids()
    run.cluster.kill()  # every node lost at once
    st = eventually(finished(api, name), timeout=60, what="FineTuneJob failed after the cluster was lost")
    assert (st["phase"], st["reason"]) == ("Failed", "ClusterLost"), st
    assert f"`kubectl delete finetunejob {name} -n {NS}`, then `kubectl apply -f` the same manifest" in st["message"], st["message"]
    assert f"resumes from the last checkpoint in {store}/{job_id(cr)}" in st["message"] and all_dead(pids)

    api.delete("FineTuneJob", NS, name)
    eventually(lambda: api.get("RayJob", NS, name) is None and api.get("FineTuneJob", NS, name) is None, timeout=30, what="old objects gone")
    api.create(copy.deepcopy(cr))
    again = eventually(lambda: next((r for r in rayjobs.runs.values() if r.name == name and r.uid != run.uid), None), timeout=30, what="new RayJob")
    started = eventually(lambda: events_of(again, "worker_start"), timeout=420, what="resubmitted job's workers started")
    assert started[0]["resumed"] is True and started[0]["step"] >= first[0]["step"] > 0, (first, started)

    # Flow 4 while the job runs: deleting the FineTuneJob stops the Ray job and every process
    pids = again.cluster.pids()
    api.delete("FineTuneJob", NS, name)
    eventually(lambda: again.torn_down and all_dead(pids), timeout=60, what="every process of the resumed cluster gone")
    eventually(lambda: api.get("RayCluster", NS, again.cluster_name) is None and api.get("RayJob", NS, name) is None, timeout=30, what="RayJob and RayCluster gone")


def test_gpu_spec_runs_until_cuda_is_needed(api, rayjobs, dataset) -> None:
    """A GPU FineTuneJob: the worker pod's GPU is declared to Ray, and Ray Train is asked for it
    (use_gpu, GPUs per worker, on the GPU worker's node) before the job fails for lack of CUDA."""
    name = "tiny-gpu"
    api.create(ftj_cr(name, dataset, resources={"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 1}))
    run = rayjobs.run_for(name, NS)
    st = eventually(finished(api, name), timeout=420, what="GPU FineTuneJob finished")
    assert st["phase"] == "Failed" and st["reason"] == "AppFailed", st
    workers = [n for n in run.cluster.nodes if n.group != "head"]
    assert [n.resources["num_gpus"] for n in workers] == [1] and run.cluster.nodes[0].resources["num_gpus"] == 0
    config = events_of(run, "train_config")
    assert config and config[0]["use_gpu"] is True and config[0]["num_workers"] == 1, config
    assert config[0]["resources_per_worker"]["GPU"] == 1 and config[0]["backend"] == "nccl", config
    # Ray's state API: the Train worker actor asked for the GPU and was placed on the GPU pod's node
    actors = run.cluster._get("/api/v0/actors?detail=true&limit=1000")["data"]["result"]["result"]
    train_workers = [a for a in actors if "TrainWorker" in a.get("class_name", "")]
    gpus_asked = [sum(v for k, v in a["required_resources"].items() if k == "GPU" or k.startswith("GPU_group_")) for a in train_workers]
    assert train_workers and all(g >= 1 for g in gpus_asked), [a["required_resources"] for a in train_workers]
    nodes = run.cluster._get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
    gpu_nodes = {n["node_id"] for n in nodes if n.get("resources_total", {}).get("GPU")}
    assert {a["node_id"] for a in train_workers} <= gpu_nodes, (train_workers, nodes)
    # The Train worker process inherits its node's env: the GPU pod's container env, Secrets resolved
    gpu_pod = next(n for n in workers if n.resources["num_gpus"])
    declared = {e["name"] for e in api.get("RayJob", NS, name)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].get("env", [])}
    assert gpu_pod.env.env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert "HF_TOKEN" in declared and gpu_pod.env.process_env()["HF_TOKEN"] == HF_TEST_TOKEN
    failure = (st.get("message") or "") + (run.logs() or "")
    assert any(word in failure for word in ("CUDA", "NCCL", "nccl", "GPU")), failure[-3000:]
