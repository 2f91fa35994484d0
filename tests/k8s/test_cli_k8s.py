"""`platformctl finetune ... --target k8s` against the in-memory API server (kmock): submit creates
a FineTuneJob, list/status read it, cancel annotates it, all through a real kubeconfig file."""

from __future__ import annotations

import json

import yaml

from llmplatform.cli.main import main


def _kubeconfig(tmp_path, url: str):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": "team-a"}}],
    }))
    return str(path)


def test_finetune_target_k8s_round_trip(cluster, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "cli-job", "base_model": "llama2-tiny", "data": {"train": str(train)}}))
    kube = ["--target", "k8s", "--kubeconfig", _kubeconfig(tmp_path, cluster.url), "-n", "team-a"]

    assert main(["finetune", "submit", str(spec), *kube, "-o", "json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["name"], created["namespace"]) == ("cli-job", "team-a")

    assert main(["finetune", "list", *kube, "-o", "json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["cli-job"]

    assert main(["finetune", "status", "cli-job", *kube, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cli-job"

    assert main(["finetune", "cancel", "cli-job", *kube]) == 0
    assert "cancel requested" in capsys.readouterr().out

    assert main(["finetune", "status", "nope", *kube]) == 1
    assert "no FineTuneJob team-a/nope" in capsys.readouterr().err


def test_serve_deploy_target_k8s_creates_then_updates_the_model_deployment(cluster, tmp_path, capsys):
    from llmplatform.kube import connect

    spec = tmp_path / "serve.yaml"
    body = {"name": "cli-serve", "engine": "vllm", "model": {"base": "llama2-7b-chat", "registry": "models:/support-bot@production"}}
    spec.write_text(yaml.safe_dump(body))
    kubeconfig = _kubeconfig(tmp_path, cluster.url)
    kube = ["--target", "k8s", "--kubeconfig", kubeconfig, "-n", "team-a"]

    assert main(["serve", "deploy", str(spec), *kube, "-o", "json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["name"], row["action"]) == ("cli-serve", "created")

    spec.write_text(yaml.safe_dump({**body, "max_loaded_adapters": 3}))
    assert main(["serve", "deploy", str(spec), *kube]) == 0
    assert "ModelDeployment team-a/cli-serve updated" in capsys.readouterr().out
    cr = connect(kubeconfig).get("ModelDeployment", "team-a", "cli-serve")
    assert cr["spec"]["max_loaded_adapters"] == 3 and cr["spec"]["model"]["registry"] == "models:/support-bot@production"

    spec.write_text(yaml.safe_dump({**body, "tensor_parallel": 3}))  # bad input: refused before anything is sent
    assert main(["serve", "deploy", str(spec), *kube]) != 0
    assert "tensor_parallel" in capsys.readouterr().err
    assert connect(kubeconfig).get("ModelDeployment", "team-a", "cli-serve")["spec"]["max_loaded_adapters"] == 3


def test_finetune_target_k8s_refuses_a_job_that_cannot_fit_before_creating_anything(cluster, tmp_path, capsys):
    from llmplatform.kube import connect

    spec = tmp_path / "too-big.yaml"
    spec.write_text(yaml.safe_dump({"name": "too-big", "base_model": "llama2-70b", "data": {"train": "s3://b/t.jsonl"},
                                    "resources": {"gpu_type": "t4-16gb", "strategy": "ddp"}}))
    kube = ["--target", "k8s", "--kubeconfig", _kubeconfig(tmp_path, cluster.url), "-n", "team-a"]
    assert main(["finetune", "submit", str(spec), *kube]) == 1
    err = capsys.readouterr().err
    assert "cannot be satisfied" in err and "resources.gpu_type" in err and "gradient_checkpointing: true" in err
    assert connect(host=cluster.url).get("FineTuneJob", "team-a", "too-big") is None
