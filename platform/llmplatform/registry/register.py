"""Register a LoRA adapter as a new MLflow model version, atomically and with lineage.

Order: check compatibility (nothing touched yet) -> make sure the registered model exists ->
upload only the adapter's files as run artifacts under `registered/<name>/<sha12>/` (skipped when
an identical upload is already there) -> create the version from `runs:/<run>/<that path>` with
lineage and compatibility facts as version tags -> wait until READY. If any step after the first
fails, what this call created (the version, and the registered model if it was new and holds no
other version) is deleted again, so no half-made version stays behind. Base models are never
uploaded: they are referenced by id/URI and hash in the lineage tags.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from llmplatform.errors import RegistryError
from llmplatform.registry import client as mc
from llmplatform.registry.compat import base_identity, check_compatibility, compatibility_facts, load_base_config
from llmplatform.specs import REGISTRY_URI

# What an adapter directory may contribute to the upload: the adapter and the tokenizer files
# that go with it. Base weights, optimizer and RNG states stay out (megabytes, not gigabytes).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                 "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.jinja")
READY_TIMEOUT_S = 120


def register_adapter(tracking_uri: Any, name: str, adapter_dir: str | Path, run_id: str, lineage: dict,
                     base_model_dir: str | Path | None = None) -> int:
    """Register the adapter in `adapter_dir` (logged to run `run_id`) as a new version of `name`.

    `lineage` keys (all optional but recorded): base_model, base_model_sha, base_model_uri,
    dataset_sha256, job_id, git_sha, spec (dict or JSON), metrics (dict). `base_model_dir` is the
    base checkpoint to check against; without it the lineage's base_model_uri / base_model is
    tried. Returns the new version number; raises RegistryError with every problem otherwise.
    """
    adapter_dir = Path(adapter_dir)
    _check_name(name)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RegistryError(f"{adapter_dir} is not an adapter directory (no adapter_config.json); "
                            "pass the folder peft `save_pretrained` wrote")
    lineage = dict(lineage or {})
    base_config = _find_base_config(base_model_dir, lineage)
    problems = check_compatibility(adapter_dir, base_config, base_model=lineage.get("base_model"))
    if problems:
        raise RegistryError(f"adapter {adapter_dir} does not fit base {lineage.get('base_model') or base_model_dir or '(unknown)'}; "
                            "nothing was registered:\n" + "\n".join(f"  - {p}" for p in problems))
    files = _adapter_files(adapter_dir)
    sha = adapter_sha256(adapter_dir, files)
    client = mc.connect(tracking_uri)
    run = _get_run(client, run_id)
    tags = version_tags(lineage, compatibility_facts(adapter_dir, base_config), sha, files)
    created_model, version = False, None
    try:
        created_model = _ensure_registered_model(client, name)
        artifact_path = f"registered/{name}/{sha[:12]}"
        if not _already_uploaded(client, run_id, artifact_path, adapter_dir, files):
            with tempfile.TemporaryDirectory(prefix="adapter-upload-") as staging:
                for f in files:
                    shutil.copy2(adapter_dir / f, Path(staging) / f)
                upload(client, run_id, staging, artifact_path)
        mv = client.create_model_version(name=name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                         tags=tags, description=version_description(lineage, tags),
                                         await_creation_for=0)
        version = int(mv.version)
        await_ready(client, name, version)
        return version
    except BaseException as exc:
        removed = _undo(client, name, version, created_model)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise RegistryError(f"registering {adapter_dir} as {name} (run {run.info.run_id}) failed: {exc}; "
                            f"rolled back: {removed or 'nothing had been created'}") from exc


def upload(client, run_id: str, local_dir: str, artifact_path: str) -> None:
    """Upload the staged adapter files (one seam, so a failure can be injected in tests)."""
    client.log_artifacts(run_id, local_dir, artifact_path)


def await_ready(client, name: str, version: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until the version is READY; FAILED_REGISTRATION or a timeout raise."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_model_version(name, str(version)).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise RegistryError(f"MLflow marked {name} version {version} FAILED_REGISTRATION")
        if time.monotonic() > deadline:
            raise RegistryError(f"{name} version {version} not READY after {timeout_s:.0f} s (status {status})")
        time.sleep(0.5)


def adapter_sha256(adapter_dir: Path, files: list[str]) -> str:
    """One hash over the uploaded files' names and bytes (what `resolve` verifies after download)."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.encode() + b"\0")
        with open(adapter_dir / f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def version_tags(lineage: dict, facts: dict, sha: str, files: list[str]) -> dict[str, str]:
    """Lineage as `platform.lineage.*`, compatibility as `platform.compat.*`, plus the adapter hash."""
    tags = {f"{mc.LINEAGE_PREFIX}{k}": mc.tag_value(v) for k, v in lineage.items() if v is not None}
    tags.update({f"{mc.COMPAT_PREFIX}{k}": mc.tag_value(v) for k, v in facts.items() if v is not None})
    tags[mc.ADAPTER_SHA_TAG] = sha
    tags["platform.adapter_files"] = mc.tag_value(sorted(files))
    tags["platform.kind"] = "lora-adapter"
    return tags


def version_description(lineage: dict, tags: dict) -> str:
    """The one paragraph the MLflow UI shows on the version page."""
    r, alpha = tags.get(f"{mc.COMPAT_PREFIX}r"), tags.get(f"{mc.COMPAT_PREFIX}lora_alpha")
    parts = [f"LoRA adapter (r={r}, alpha={alpha}) for base {lineage.get('base_model', 'unknown')}"]
    for key, label in (("dataset_sha256", "dataset sha256"), ("job_id", "job"), ("git_sha", "git")):
        if lineage.get(key):
            parts.append(f"{label} {lineage[key]}")
    return "; ".join(parts) + ". Registered by platformctl."


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not REGISTRY_URI.match(f"models:/{name}/1"):
        raise RegistryError(f"model name {name!r} is not valid; use letters, digits, '.', '_' and '-', starting with a letter or digit")


def _adapter_files(adapter_dir: Path) -> list[str]:
    files = [f for f in ADAPTER_FILES if (adapter_dir / f).is_file()]
    if not any(f.startswith("adapter_model.") for f in files):
        raise RegistryError(f"{adapter_dir} has no adapter weights (adapter_model.safetensors or adapter_model.bin)")
    return files


def _find_base_config(base_model_dir: str | Path | None, lineage: dict) -> dict | None:
    """The base config to check against: the given dir, else a local base_model_uri / base_model.

    Nothing is built or downloaded here: a base that is only an HF id is recorded, not checked.
    """
    if base_model_dir is not None:
        try:
            return load_base_config(base_model_dir)
        except FileNotFoundError as exc:
            raise RegistryError(f"base_model_dir: {exc}") from exc
    for candidate in (lineage.get("base_model_uri"), lineage.get("base_model")):
        if candidate:
            local = Path(base_identity(str(candidate)))
            if (local / "config.json").is_file():
                return load_base_config(local)
    return None


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if mc.is_not_found(exc):
            raise RegistryError(f"run {run_id!r} not found on {mc.uri_of(client)}; register adapters from a logged run") from exc
        raise


def _ensure_registered_model(client, name: str) -> bool:
    """Create the registered model if missing; True when this call created it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={"platform.kind": "lora-adapter"},
                                       description="LoRA adapters registered by llm-platform (platformctl models show).")
        return True
    except MlflowException as exc:
        if mc.is_already_exists(exc):
            return False
        raise


def _already_uploaded(client, run_id: str, artifact_path: str, adapter_dir: Path, files: list[str]) -> bool:
    """Identical files (names and sizes; the path holds the content hash) are already logged."""
    logged = {Path(f.path).name: f.file_size for f in client.list_artifacts(run_id, artifact_path) if not f.is_dir}
    return all(logged.get(f) == (adapter_dir / f).stat().st_size for f in files)


def _undo(client, name: str, version: int | None, created_model: bool) -> str:
    """Delete what this registration created; returns what was removed, for the error message."""
    removed = []
    try:
        if version is not None:
            client.delete_model_version(name, str(version))
            removed.append(f"version {version}")
        if created_model:
            others = client.search_model_versions(f"name = '{name}'")
            if not others:  # a concurrent registration may have added a version meanwhile: keep it
                client.delete_registered_model(name)
                removed.append(f"registered model {name}")
    except Exception as exc:  # report, but keep the original failure as the cause
        removed.append(f"cleanup incomplete ({exc}); delete {name} version {version} by hand")
    return ", ".join(removed)
