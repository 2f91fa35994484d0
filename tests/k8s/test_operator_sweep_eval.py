"""Sweeps and evaluations on Kubernetes: the RayJobs the operator builds for a FineTuneJob with a
`sweep:` section and for an EvaluationJob (validated against KubeRay v1.7.0's schema), the real
operator (kopf) against kmock creating them and mirroring KubeRay's status onto our CRs, bad specs
ending Failed with the field named, and `platformctl finetune sweep|eval submit --target k8s`
creating the right CR. KubeRay is played by writing the RayJob status it would write."""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest
import yaml

from llmplatform.backends.k8s import evaluation_job_cr, finetune_job_cr
from llmplatform.cli.main import main
from llmplatform.kube import KubeApi, connect
from llmplatform.resolve import Facts, resolve
from llmplatform.specs import parse_spec

from k8s_harness import eventually

from llmoperator.reconcile import evaluation, finetune
from llmoperator.reconcile.common import OperatorConfig

NS = "team-a"
CFG = OperatorConfig(image="registry.example/llm-platform:test")
SWEEP = {"params": {"hyperparameters.learning_rate": [1e-4, 3e-4, 1e-3], "lora.rank": [8, 16]}, "max_concurrent": 2, "early_stop": "asha"}


def sweep_ftj(name: str, sweep: dict | None = None, uid: str = "uid-sweep") -> dict:
    spec = parse_spec("finetune", {"name": name, "base_model": "llama2-7b", "method": "qlora", "data": {"train": "s3://data/support.jsonl"},
                                   "resources": {"workers": 2, "gpus_per_worker": 1, "gpu_type": "a100-80gb"}, "sweep": sweep or SWEEP})
    cr = finetune_job_cr(spec, NS)
    cr["metadata"]["uid"] = uid
    return cr


def evj(name: str, uid: str = "uid-eval", **extra) -> dict:
    spec = parse_spec("eval", {"name": name, "models": ["llama2-7b", "support-bot@production"],
                               "dataset": {"name": "support", "path": "s3://data/support-eval.jsonl"},
                               "metrics": ["exact_match", {"scorer": "regex", "params": {"pattern": "^ok"}}], **extra})
    cr = evaluation_job_cr(spec, NS)
    cr["metadata"]["uid"] = uid
    return cr


def unique(request: pytest.FixtureRequest, prefix: str) -> str:
    return f"{prefix}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"


def status_of(api: KubeApi, kind: str, name: str) -> dict:
    return (api.get(kind, NS, name) or {}).get("status") or {}


SLOW = 45.0  # s: the operator shares two cores with other work here


def phase_is(api: KubeApi, kind: str, name: str, phase: str):
    return lambda: (st := status_of(api, kind, name)).get("phase") == phase and st


def true_conditions(st: dict) -> set[str]:
    return {c["type"] for c in st.get("conditions") or [] if c["status"] == "True"}


# ---------------------------------------------------------------------------- the RayJobs (pure)


def test_a_sweep_rayjob_runs_every_resolved_trial_on_a_group_sized_for_max_concurrent(manifest_validator) -> None:
    cr = sweep_ftj("sweep-pure")
    rayjob = finetune.rayjob_for(cr, CFG)
    manifest_validator.validate(rayjob)
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "llmplatform.training.sweep", "--sweep-json"]
    assert argv[argv.index("--job-id") + 1] == finetune.job_id(cr) and "--run-id" not in argv  # the driver creates the parent run
    doc = json.loads(argv[4])
    assert len(doc["plans"]) == 6 and doc["sweep"]["early_stop"] == "asha" and doc["sweep"]["max_concurrent"] == 2
    assert doc["sweep"]["overrides"][5] == {"hyperparameters.learning_rate": 1e-3, "lora.rank": 16}
    trial = parse_spec("finetune", doc["plans"][5]["spec"])
    assert (trial.name, trial.lora.rank, trial.hyperparameters.learning_rate, trial.sweep) == ("sweep-pure-t5", 16, 1e-3, None)
    # each trial is resolved as the operator resolves a fine-tune: the same plan as resolving that spec on k8s
    assert doc["plans"][5] == resolve(trial, Facts(target="k8s", platform_home="/home/ray/.llm-platform")).to_dict()
    base = json.loads(argv[argv.index("--resolved-json") + 1])
    assert base["spec"]["sweep"]["params"] == SWEEP["params"]
    [group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["maxReplicas"] == 2 * 2  # 2 trials at once x 2 one-GPU workers each
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert rayjob["spec"]["metadata"]["sweep_trials"] == "6"


def test_an_evaluation_rayjob_runs_the_entrypoint_on_its_worker_pod(manifest_validator) -> None:
    cr = evj("eval-pure", resources={"cpus": 8, "gpus": 1, "memory_gb": 40, "node_selector": {"gpu": "a100"}})
    manifest_validator.validate(cr)  # the CLI's CR passes our generated CRD's schema
    rayjob = evaluation.rayjob_for(cr, CFG)
    manifest_validator.validate(rayjob)
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "llmplatform.evaluation.entrypoint", "--spec-json"]
    sent = parse_spec("eval", json.loads(argv[4]))
    assert sent.models == ["llama2-7b", "support-bot@production"] and [m.metric for m in sent.metrics] == ["exact_match", "regex"]
    assert argv[5:] == ["--job-id", "eval-pure-uideval"]
    assert (spec["entrypointNumCpus"], spec["entrypointNumGpus"]) == (8, 1)  # the driver holds the worker pod
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    [group] = spec["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["replicas"] == 1 and pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "40Gi", "nvidia.com/gpu": 1}
    assert {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": "llm-platform-mlflow", "key": "tracking-uri"}}} in pod["containers"][0]["env"]
    assert rayjob["metadata"]["ownerReferences"][0]["kind"] == "EvaluationJob"


# ---------------------------------------------------------------------------- the operator against kmock


@pytest.fixture()
def api(cluster, operator) -> KubeApi:
    return connect(host=cluster.url)


def test_the_operator_runs_a_sweep_finetunejob_and_mirrors_its_rayjob(api: KubeApi, request) -> None:
    name = unique(request, "sweep")
    api.create(sweep_ftj(name, uid=f"uid-{name}"))
    rayjob = eventually(lambda: api.get("RayJob", NS, name), what="RayJob created")
    assert shlex.split(rayjob["spec"]["entrypoint"])[2] == "llmplatform.training.sweep"
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4
    eventually(phase_is(api, "FineTuneJob", name, "Pending"), timeout=SLOW, what="Pending")
    api.patch_status("RayJob", NS, name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": f"{name}-x1", "rayClusterName": f"{name}-rc"})
    st = eventually(phase_is(api, "FineTuneJob", name, "Running"), timeout=SLOW, what="Running")
    assert true_conditions(st) == {"Running"}
    api.patch_status("RayJob", NS, name, {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete", "endTime": "2026-12-05T02:00:00Z"})
    st = eventually(phase_is(api, "FineTuneJob", name, "Succeeded"), timeout=SLOW, what="Succeeded")
    assert true_conditions(st) == {"Succeeded"} and st["completionTime"] == "2026-12-05T02:00:00Z"


def test_the_operator_runs_an_evaluationjob_and_reports_its_scores(api: KubeApi, request) -> None:
    name = unique(request, "eval")
    api.create(evj(name, uid=f"uid-{name}"))
    rayjob = eventually(lambda: api.get("RayJob", NS, name), what="RayJob created")
    assert rayjob["metadata"]["labels"]["llmplatform.io/evaluationjob"] == name
    st = eventually(phase_is(api, "EvaluationJob", name, "Pending"), timeout=SLOW, what="Pending")
    assert st["rayJobName"] == name and [c["type"] for c in st["conditions"]] == ["Running", "Succeeded", "Failed"]
    api.patch_status("RayJob", NS, name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": f"{name}-x1", "rayClusterName": f"{name}-rc"})
    st = eventually(phase_is(api, "EvaluationJob", name, "Running"), timeout=SLOW, what="Running")
    assert st["message"] == "evaluating" and true_conditions(st) == {"Running"}
    api.patch_status("RayJob", NS, name, {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete", "endTime": "2026-12-05T02:00:00Z"})
    st = eventually(phase_is(api, "EvaluationJob", name, "Succeeded"), timeout=SLOW, what="Succeeded")
    assert true_conditions(st) == {"Succeeded"} and "evaluation finished" in st["message"]
    st = eventually(lambda: (s := status_of(api, "EvaluationJob", name)).get("results") and s, timeout=SLOW, what="results in status")
    job = evaluation.job_id(api.get("EvaluationJob", NS, name))
    assert st["jobId"] == job
    assert [(r["model"], r["runId"], r["metrics"]) for r in st["results"]] == [
        ("llama2-7b", f"run-{job}-0", {"exact_match": 0.5}), ("support-bot@production", f"run-{job}-1", {"exact_match": 0.75})]


def test_a_failed_evaluation_rayjob_fails_the_evaluationjob(api: KubeApi, request) -> None:
    name = unique(request, "evfail")
    api.create(evj(name, uid=f"uid-{name}"))
    eventually(lambda: api.get("RayJob", NS, name), what="RayJob created")
    api.patch_status("RayJob", NS, name, {"jobDeploymentStatus": "Running", "jobStatus": "FAILED", "message": "EvalError: dataset has no references"})
    st = eventually(phase_is(api, "EvaluationJob", name, "Failed"), timeout=SLOW, what="Failed")
    assert st["reason"] == "AppFailed" and "the evaluation job failed: EvalError: dataset has no references" in st["message"]
    assert true_conditions(st) == {"Failed"}


@pytest.mark.parametrize("kind, body, field", [
    ("EvaluationJob", {"models": ["llama2-7b"], "dataset": {"name": "d", "path": "s3://d.jsonl"}, "metrics": [{"scorer": "exact_mtch"}]},
     "metrics.0.scorer"),
    ("EvaluationJob", {"models": ["llama2-7b"], "dataset": {"name": "d"}}, "dataset.path"),
    ("FineTuneJob", {"base_model": "llama2-7b", "data": {"train": "s3://d.jsonl"},
                     "sweep": {"params": {"hyperparameters.learnig_rate": [1e-4, 3e-4]}}}, "sweep.params.hyperparameters.learnig_rate"),
    ("FineTuneJob", {"base_model": "llama2-7b", "data": {"train": "s3://d.jsonl"},
                     "sweep": {"params": {"lora.rank": [8, 0]}}}, "sweep.params.lora.rank"),
    ("FineTuneJob", {"base_model": "llama2-7b", "data": {"train": "s3://d.jsonl"},
                     "sweep": {"params": {"lora.rank": [8]}, "search": "random"}}, "sweep.trials"),
    ("FineTuneJob", {"base_model": "llama2-7b", "data": {"train": "s3://d.jsonl", "validation_split": 0},
                     "sweep": {"params": {"lora.rank": [8]}}}, "sweep.metric"),
], ids=["unknown-scorer", "dataset-without-path", "sweep-unknown-field", "sweep-bad-value", "random-without-trials", "eval-metric-without-validation"])
def test_a_bad_spec_fails_naming_the_field(api: KubeApi, request, kind: str, body: dict, field: str) -> None:
    name = unique(request, "bad")
    api.create({"apiVersion": "llmplatform.io/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": body})
    st = eventually(phase_is(api, kind, name, "Failed"), timeout=SLOW, what="Failed")
    assert st["reason"] == "InvalidSpec" and f"{field}:" in st["message"], st["message"]
    assert true_conditions(st) == {"Failed"}
    assert api.get("RayJob", NS, name) is None


# ---------------------------------------------------------------------------- the CLI's --target k8s


@pytest.fixture()
def kube(cluster, operator, tmp_path, monkeypatch) -> list[str]:
    monkeypatch.delenv("PLATFORM_K8S_NAMESPACE", raising=False)
    monkeypatch.delenv("PLATFORM_K8S_CONTEXT", raising=False)
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "kmock",
                                    "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}], "users": [{"name": "u", "user": {}}],
                                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": NS}}]}))
    return ["--target", "k8s", "--kubeconfig", str(path)]


def _finetune_spec(tmp_path, name: str) -> str:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "base_model": "llama2-tiny", "data": {"train": str(train)}}))
    return str(spec)


def test_finetune_sweep_target_k8s_creates_a_finetunejob_with_the_flags_as_its_sweep_section(kube, api, tmp_path, capsys) -> None:
    argv = ["finetune", "sweep", _finetune_spec(tmp_path, "cli-sweep"), "--param", "hyperparameters.learning_rate=1e-4,3e-4",
            "--param", "lora.rank=8,16", "--max-concurrent", "3", "--early-stop", "asha", *kube, "--detach", "-o", "json"]
    assert main(argv) == 0, capsys.readouterr().err
    row = json.loads(capsys.readouterr().out)
    assert (row["name"], row["namespace"], row["phase"], row["ray_job"]) == ("cli-sweep", NS, "Pending", "cli-sweep")  # the operator took it
    section = api.get("FineTuneJob", NS, "cli-sweep")["spec"]["sweep"]
    assert section == {"params": {"hyperparameters.learning_rate": [1e-4, 3e-4], "lora.rank": [8, 16]}, "search": "grid", "trials": None,
                       "metric": "eval_loss", "mode": "min", "max_concurrent": 3, "early_stop": "asha"}
    rayjob = api.get("RayJob", NS, "cli-sweep")
    doc = json.loads(shlex.split(rayjob["spec"]["entrypoint"])[4])
    assert len(doc["plans"]) == 4 and rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3


def test_finetune_sweep_refuses_a_bad_param_before_creating_anything(kube, api, tmp_path, capsys) -> None:
    argv = ["finetune", "sweep", _finetune_spec(tmp_path, "cli-badsweep"), "--param", "lora.rnak=8,16", *kube, "--detach"]
    assert main(argv) == 1
    assert "--param lora.rnak: lora has no field 'rnak'" in capsys.readouterr().err
    assert api.get("FineTuneJob", NS, "cli-badsweep") is None


def test_eval_submit_target_k8s_creates_an_evaluationjob_and_lists_it(kube, api, tmp_path, capsys) -> None:
    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump({"name": "cli-eval", "models": ["llama2-tiny"], "dataset": {"name": "rev", "path": "s3://d/rev.jsonl"},
                                    "metrics": ["exact_match", "token_f1"]}))
    assert main(["eval", "submit", str(spec), "--model", "support-bot@production", *kube, "-o", "json"]) == 0, capsys.readouterr().err
    row = json.loads(capsys.readouterr().out)
    assert (row["name"], row["namespace"], row["phase"], row["dataset"]) == ("cli-eval", NS, "Pending", "rev")
    cr = api.get("EvaluationJob", NS, "cli-eval")
    assert cr["spec"]["models"] == ["support-bot@production"] and cr["spec"]["metrics"] == [{"scorer": "exact_match"}, {"scorer": "token_f1"}]
    assert api.get("RayJob", NS, "cli-eval")["metadata"]["labels"]["llmplatform.io/evaluationjob"] == "cli-eval"
    assert main(["eval", "list", *kube, "-o", "json"]) == 0
    assert "cli-eval" in [r["name"] for r in json.loads(capsys.readouterr().out)]
