"""Registration against a real MLflow server: lineage, only adapter files, resolve, atomicity, refusals."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from mlflow.exceptions import MlflowException

from llmplatform.errors import RegistryError
from llmplatform.registry import register as register_mod
from llmplatform.registry import register_adapter, resolve

pytestmark = pytest.mark.integration


def versions_of(reg) -> list[int]:
    return sorted(int(v.version) for v in reg.client.search_model_versions(f"name = '{reg.name}'"))


def test_register_records_lineage_and_compatibility_and_resolves(reg, monkeypatch):
    version = reg.register(eval_loss=1.0)
    mv = reg.client.get_model_version(reg.name, str(version))
    assert mv.tags["platform.lineage.dataset_sha256"] == "d" * 64
    assert json.loads(mv.tags["platform.lineage.spec"])["lora"]["rank"] == 8
    assert (mv.tags["platform.compat.r"], mv.tags["platform.compat.vocab_size"]) == ("8", "1024")
    assert mv.source.startswith(f"runs:/{mv.run_id}/registered/{reg.name}/")

    by_alias_missing = pytest.raises(RegistryError, match="no alias 'production'")
    with by_alias_missing:
        resolve(reg.uri, f"models:/{reg.name}@production")
    got = resolve(reg.uri, f"models:/{reg.name}/{version}")
    assert (got.version, got.run_id, got.base_model) == (version, mv.run_id, str(reg.tiny["base"]))
    assert got.lineage["dataset_sha256"] == "d" * 64 and got.compatibility["r"] == 8
    from llmplatform.paths import model_cache

    assert got.local_path.is_relative_to(model_cache())  # cached in the platform's model cache
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (got.local_path / f).read_bytes() == (reg.tiny["good"] / f).read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.uri)  # the one-argument form uses the default server
    again = resolve(f"models:/{reg.name}/{version}")  # cached, same verified directory
    assert again.local_path == got.local_path and again.adapter_sha256 == got.adapter_sha256


def test_only_adapter_files_are_uploaded(reg, tmp_path):
    adapter = shutil.copytree(reg.tiny["good"], tmp_path / "ckpt")
    (adapter / "model.safetensors").write_bytes(b"\0" * 4096)   # a base model copy must not travel
    (adapter / "optimizer.pt").write_bytes(b"\0" * 4096)
    run_id = reg.run(eval_loss=1.0)
    version = register_adapter(reg.uri, reg.name, adapter, run_id, reg.lineage(), base_model_dir=reg.tiny["base"])
    source = reg.client.get_model_version(reg.name, str(version)).source.split(f"runs:/{run_id}/")[1]
    uploaded = sorted(f.path.rsplit("/", 1)[1] for f in reg.client.list_artifacts(run_id, source))
    assert uploaded == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _failing_upload(client, run_id, local_dir, artifact_path):
    """Upload one real file, then fail like a dropped connection."""
    client.log_artifact(run_id, f"{local_dir}/adapter_config.json", artifact_path)
    raise OSError("injected: connection reset during upload")


def test_upload_failure_leaves_no_registered_model_behind(reg, monkeypatch):
    monkeypatch.setattr(register_mod, "upload", _failing_upload)
    with pytest.raises(RegistryError, match="injected.*rolled back: registered model") as err:
        reg.register(eval_loss=1.0)
    assert "connection reset" in str(err.value)
    with pytest.raises(MlflowException, match="not found"):
        reg.client.get_registered_model(reg.name)


def test_upload_failure_leaves_existing_versions_alone_and_retry_works(reg, monkeypatch):
    first = reg.register(eval_loss=1.0)
    run_id = reg.run(eval_loss=0.9)
    real_upload = register_mod.upload
    monkeypatch.setattr(register_mod, "upload", _failing_upload)
    with pytest.raises(RegistryError, match="injected"):
        register_adapter(reg.uri, reg.name, reg.tiny["good"], run_id, reg.lineage(), base_model_dir=reg.tiny["base"])
    assert versions_of(reg) == [first]
    monkeypatch.setattr(register_mod, "upload", real_upload)
    # the same run again: the half-uploaded folder is completed, not trusted
    second = register_adapter(reg.uri, reg.name, reg.tiny["good"], run_id, reg.lineage(), base_model_dir=reg.tiny["base"])
    assert versions_of(reg) == [first, second]
    assert (resolve(reg.uri, f"models:/{reg.name}/{second}").local_path / "adapter_model.safetensors").is_file()


def test_failure_after_version_creation_deletes_the_version(reg, monkeypatch):
    first = reg.register(eval_loss=1.0)

    def never_ready(client, name, version, timeout_s=0):
        raise RegistryError(f"{name} version {version} not READY (injected)")

    monkeypatch.setattr(register_mod, "await_ready", never_ready)
    with pytest.raises(RegistryError, match=r"rolled back: version 2"):
        reg.register(eval_loss=0.9)
    assert versions_of(reg) == [first]


def test_incompatible_adapter_is_refused_before_anything_is_created(reg, tmp_path):
    with pytest.raises(RegistryError, match="vocab_size is 1024") as err:
        reg.register(adapter="vocab", eval_loss=1.0)
    assert "nothing was registered" in str(err.value)
    bad = shutil.copytree(reg.tiny["good"], tmp_path / "rank")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(r=4, target_modules=["q_proj", "v_proj", "wq"])
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RegistryError) as err:
        register_adapter(reg.uri, reg.name, bad, reg.run(), reg.lineage(), base_model_dir=reg.tiny["base"])
    assert "r=4" in str(err.value) and "'wq'" in str(err.value)
    with pytest.raises(RegistryError, match="base_model_name_or_path"):
        register_adapter(reg.uri, reg.name, reg.tiny["good"], reg.run(), reg.lineage(base_model="meta-llama/Llama-2-13b-hf"),
                         base_model_dir=reg.tiny["base"])
    with pytest.raises(MlflowException, match="not found"):
        reg.client.get_registered_model(reg.name)


def test_unknown_run_is_refused(reg):
    with pytest.raises(RegistryError, match="run 'f+' not found"):
        register_adapter(reg.uri, reg.name, reg.tiny["good"], "f" * 32, reg.lineage(), base_model_dir=reg.tiny["base"])


def test_concurrent_resolves_all_get_a_complete_adapter(reg, tmp_path):
    """Serving replicas resolve the same version at once: nobody may see half a download."""
    from concurrent.futures import ThreadPoolExecutor

    version = reg.register(eval_loss=1.0)
    cache = tmp_path / "adapters"
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda _: resolve(reg.uri, f"models:/{reg.name}/{version}", cache_dir=cache), range(12)))
    assert len({g.local_path for g in got}) == 1
    assert all((g.local_path / "adapter_config.json").is_file() for g in got)
