"""`platformctl serve status|list|chat` against the shared deployment."""

from __future__ import annotations

import json
import re

import pytest

from llmplatform.cli.main import main

pytestmark = pytest.mark.integration


def test_status_json_list_and_chat(tiny_app, capsys):
    assert main(["serve", "status", "tiny-chat", "--output", "json", "--api-key", tiny_app["key"]]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["engine"]["engine"] == "hf" and st["url"] == tiny_app["url"] and st["base_model"] == "llama2-tiny-random"
    assert main(["serve", "list"]) == 0
    assert "tiny-chat" in capsys.readouterr().out
    assert main(["serve", "chat", "tiny-chat", "Hello there", "--system", "Be brief.", "--max-tokens", "6",
                 "--api-key", tiny_app["key"]]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_with_wrong_key_is_a_clean_error(tiny_app, capsys):
    assert main(["serve", "chat", "tiny-chat", "Hello", "--api-key", "wrong"]) == 1
    assert "401" in capsys.readouterr().err


def test_unknown_deployment_is_a_clean_error(tiny_app, capsys):
    assert main(["serve", "delete", "no-such-app"]) == 1
    assert "no serving deployment named 'no-such-app'" in capsys.readouterr().err


def _broken_base(base_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken-base"
    shutil.copytree(base_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return broken


def test_deploy_that_fails_in_its_replicas_says_why(serving_env, base_dir, tmp_path, capsys):
    """A replica constructor that raises (here: weights that cannot load) fails the deploy with the
    replica's exception in the message, not only Serve's 'Failed to update'; with --keep-failed the
    failed application stays for inspection."""
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"name: kept-failed\nmax_model_len: 256\nmodel:\n  base: {_broken_base(base_dir, tmp_path)}\n")
    try:
        assert main(["serve", "deploy", str(spec), "--target", "ray", "--ray-address", serving_env["ray_address"],
                     "--timeout", "120", "--keep-failed"]) == 1
        err = capsys.readouterr().err
        assert "deployment 'kept-failed' failed" in err and "Error" in err.split("failed:", 1)[1]
        assert "platformctl serve delete kept-failed" in err
        # while it waited: the application's state and each deployment's status (and replica states once it has some)
        assert re.search(r"deploying kept-failed: [A-Z_]+  \S+ [A-Z_]+", err), err
        assert main(["serve", "list"]) == 0 and "kept-failed" in capsys.readouterr().out
    finally:
        main(["serve", "delete", "kept-failed"])


def test_engine_vllm_where_vllm_is_missing_is_refused_before_anything_is_deployed(serving_env, base_dir, tmp_path, capsys):
    """The resolve step knows vLLM is not installed: the spec is refused naming `engine`, and no
    application is created (it used to fail in the replicas with ModuleNotFoundError)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here, so the engine would start")
    spec = tmp_path / "novllm.yaml"
    spec.write_text(f"name: no-vllm\nengine: vllm\nmax_model_len: 256\nmodel:\n  base: {base_dir}\n")
    assert main(["serve", "deploy", str(spec), "--target", "ray", "--ray-address", serving_env["ray_address"], "--timeout", "120"]) == 1
    err = capsys.readouterr().err
    assert "cannot be satisfied" in err and "engine: vllm is not installed" in err
    assert main(["serve", "list"]) == 0 and "no-vllm" not in capsys.readouterr().out


def test_a_base_model_that_cannot_load_fails_the_deploy_at_once_and_is_removed(serving_env, base_dir, tmp_path, capsys):
    """The replica's own exception is reported as soon as its constructor raises (not after the
    whole timeout, blaming a slow __init__), and the new application is removed again."""
    import time

    broken = _broken_base(base_dir, tmp_path)
    spec = tmp_path / "broken.yaml"
    spec.write_text(f"name: broken-base\nmodel:\n  base: {broken}\n")
    started = time.monotonic()
    try:
        code = main(["serve", "deploy", str(spec), "--target", "ray", "--ray-address", serving_env["ray_address"], "--timeout", "600"])
        took = time.monotonic() - started
        err = capsys.readouterr().err
        assert code == 1 and took < 180, (took, err)
        assert "deployment 'broken-base' failed" in err and "slow __init__" not in err
        assert "Error" in err.split("failed:", 1)[1]  # the replica's exception, e.g. SafetensorError: ...
        assert "removed" in err and "--keep-failed" in err
        assert main(["serve", "list"]) == 0 and "broken-base" not in capsys.readouterr().out
    finally:
        main(["serve", "delete", "broken-base"])


def _in_memory_cluster():
    """tests/k8s's kmock API server (on sys.path when the k8s tests are collected; not when only these run)."""
    import sys
    from pathlib import Path

    k8s_tests = str(Path(__file__).resolve().parents[2] / "k8s")
    if k8s_tests not in sys.path:
        sys.path.insert(0, k8s_tests)
    from k8s_harness import InMemoryCluster

    return InMemoryCluster()


def test_chat_target_k8s_goes_to_the_model_deployments_endpoint_or_url(tiny_app, tmp_path, capsys, monkeypatch):
    """`serve chat --target k8s` takes the URL from the ModelDeployment's status.endpoint (what the
    operator writes: the RayService's serve Service), or from --url (a `kubectl port-forward`);
    both point here at the real shared deployment, and the key comes from --api-key or $PLATFORM_API_KEY."""
    import yaml

    from llmplatform.backends.k8s import model_deployment_cr
    from llmplatform.kube import connect
    from llmplatform.specs import parse_spec

    local = tiny_app["url"].removesuffix("/v1")  # http://127.0.0.1:PORT, the Serve proxy (route prefix "/")
    monkeypatch.delenv("PLATFORM_API_KEY", raising=False)
    with _in_memory_cluster() as cluster:
        api = connect(host=cluster.url)
        api.create(model_deployment_cr(parse_spec("serve", tiny_app["spec"]), "team-a"))
        api.patch_status("ModelDeployment", "team-a", "tiny-chat", {"phase": "Ready", "endpoint": local, "rayServiceName": "tiny-chat"})
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock", "users": [{"name": "u", "user": {}}],
            "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": "team-a"}}]}))
        kube = ["--target", "k8s", "--kubeconfig", str(kubeconfig)]

        assert main(["serve", "chat", "tiny-chat", "Hello there", "--max-tokens", "6", "--api-key", tiny_app["key"], *kube]) == 0
        assert capsys.readouterr().out.strip()

        # The operator's endpoint is cluster DNS, unreachable from here: --url wins, the key from the env.
        api.patch_status("ModelDeployment", "team-a", "tiny-chat", {"endpoint": "http://tiny-chat-serve-svc.team-a.svc:8000"})
        monkeypatch.setenv("PLATFORM_API_KEY", tiny_app["key"])
        assert main(["serve", "chat", "tiny-chat", "Hello there", "--max-tokens", "6", "--url", local, *kube]) == 0
        assert capsys.readouterr().out.strip()

        assert main(["serve", "chat", "tiny-chat", "Hello", "--url", local + "/v1", "--api-key", "wrong", *kube]) == 1
        assert "401" in capsys.readouterr().err
