"""Fixtures for the serving tests: one real Serve deployment of llama2-tiny + adapters, shared.

The Ray head and MLflow come from the session `local_stack`; this file adds LoRA adapters
(random-init, so each one visibly changes the model's greedy output), registers two of them as
versions 1 and 2 of `support-bot` with `production` on version 1, and deploys one application
(auth on, registry polled every second) that every test in this directory uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

API_KEY = "sk-test-serving-0123456789"
BASE = "llama2-tiny-random"
REGISTERED = "support-bot"


def make_adapter(base_dir: str, out: Path, seed: int, hidden: int | None = None) -> Path:
    """A LoRA adapter with random (non-zero) weights; `hidden` builds it for a different base shape."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if hidden is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    else:
        cfg = AutoConfig.from_pretrained(base_dir)
        cfg.hidden_size, cfg.intermediate_size = hidden, hidden * 3
        model = AutoModelForCausalLM.from_config(cfg)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_factory():
    """`make_adapter(base_dir, out, seed, hidden=None)` for tests that build their own adapters."""
    return make_adapter


@pytest.fixture(scope="module", autouse=True)
def session_model_cache_env() -> None:
    """Overrides the root conftest's: these modules keep the cache serving_env set (its replicas
    were deployed with it); serving_env restores the session's at the end of the session."""


@pytest.fixture(scope="session")
def serving_env(local_stack, tmp_path_factory):
    """Env for the driver and (forwarded) for replicas; Ray connected to the local stack."""
    import ray

    cache = tmp_path_factory.mktemp("serve-models")
    from llmplatform.backends.ray_auth import AUTH_KEYS, use_client_env

    saved = {k: os.environ.get(k) for k in ("PLATFORM_MODEL_CACHE", "MLFLOW_TRACKING_URI", "PLATFORM_HOME", *AUTH_KEYS)}
    os.environ.update({"PLATFORM_MODEL_CACHE": str(cache), "MLFLOW_TRACKING_URI": local_stack.mlflow_url,
                       "PLATFORM_HOME": str(local_stack.home)})
    use_client_env(local_stack.client_env)  # the stack's Ray token
    from llmplatform.serving.app import connect, ensure_serve

    connect(local_stack.ray_address)
    ensure_serve()
    try:
        yield {"ray_address": local_stack.ray_address, "mlflow": local_stack.mlflow_url, "cache": cache,
               "cpu_partition": local_stack.cpu_partition}
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def base_dir(serving_env) -> str:
    from llmplatform.basemodels import locate

    return locate(BASE)


@pytest.fixture(scope="session")
def adapter_dirs(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(base_dir, root / "a", 1), "v1": make_adapter(base_dir, root / "v1", 2),
            "v2": make_adapter(base_dir, root / "v2", 3), "misfit": make_adapter(base_dir, root / "misfit", 4, hidden=128)}


@pytest.fixture(scope="session")
def registry_versions(serving_env, adapter_dirs, base_dir) -> dict[str, int]:
    """support-bot v1 (production) and v2, registered through llmplatform.registry."""
    from mlflow.tracking import MlflowClient

    from llmplatform import registry

    uri = serving_env["mlflow"]
    client = MlflowClient(uri)
    exp = client.create_experiment(f"serving-tests-{os.getpid()}")
    run = client.create_run(exp)
    lineage = {"base_model": BASE}
    v1 = registry.register_adapter(uri, REGISTERED, adapter_dirs["v1"], run.info.run_id, lineage, base_model_dir=base_dir)
    v2 = registry.register_adapter(uri, REGISTERED, adapter_dirs["v2"], run.info.run_id, lineage, base_model_dir=base_dir)
    client.set_terminated(run.info.run_id)
    registry.promote(uri, REGISTERED, v1, "production")
    return {"v1": v1, "v2": v2}


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    from llmplatform.serving.ingress import hash_key

    path = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    path.write_text(f"# hashed keys only\nsha256:{hash_key(API_KEY)}\n")
    return path


@pytest.fixture(scope="session")
def tiny_app(serving_env, adapter_dirs, registry_versions, keys_file) -> dict:
    """The shared deployment: base + local adapter `a` + registry `support-bot@production`."""
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app

    spec = {
        "name": "tiny-chat", "engine": "hf", "max_model_len": 512,
        "model": {"base": BASE, "adapters": [{"name": "a", "source": str(adapter_dirs["a"])}],
                  "registry": f"models:/{REGISTERED}@production"},
        "limits": {"max_concurrent_requests": 32, "max_queued_requests": 8, "max_batch_size": 32, "request_timeout_s": 60},
        "auth": {"enabled": True, "api_keys_file": str(keys_file), "api_keys_env": None},
        "registry_poll_s": 1.0, "max_loaded_adapters": 4,
    }
    status = deploy_spec(spec, serving_env["ray_address"])
    yield {"url": status["url"], "spec": spec, "status": status, "key": API_KEY, "cpu_partition": serving_env["cpu_partition"]}
    app.delete("tiny-chat")
