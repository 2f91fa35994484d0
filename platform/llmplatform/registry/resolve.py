"""Resolve `models:/NAME@ALIAS` or `models:/NAME/VERSION` to a downloaded, verified adapter.

Serving calls this: it gets the version, its lineage (base model, dataset hash, run id, ...),
and a local adapter directory. Versions are immutable, so downloads are cached under
`<model cache>/adapters/<name>/v<version>-<sha12>` and verified against the adapter hash
recorded at registration (a corrupted or tampered download is an error, not a silent serve).
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmplatform.errors import RegistryError
from llmplatform.paths import model_cache
from llmplatform.registry import client as mc
from llmplatform.registry.refs import parse_ref
from llmplatform.registry.register import _adapter_files, adapter_sha256


@dataclass(frozen=True)
class ResolvedAdapter:
    """A registry reference made concrete: which version, where its files are, what it came from."""

    name: str
    version: int
    alias: str | None
    local_path: Path
    base_model: str | None
    lineage: dict = field(default_factory=dict)
    run_id: str | None = None
    adapter_sha256: str | None = None
    compatibility: dict = field(default_factory=dict)   # the facts checked at registration

    def to_dict(self) -> dict:
        return {**asdict(self), "local_path": str(self.local_path)}


def resolve(tracking_uri: Any, ref: str | None = None, cache_dir: str | Path | None = None) -> ResolvedAdapter:
    """Look up `ref` in the registry and download (or reuse) the adapter files it names.

    `resolve(uri, "models:/bot@production")`; `resolve("models:/bot@production")` uses the
    default tracking server ($MLFLOW_TRACKING_URI, else the running local stack).
    """
    if ref is None and isinstance(tracking_uri, str) and tracking_uri.startswith("models:/"):
        tracking_uri, ref = None, tracking_uri
    client = mc.connect(tracking_uri)
    parsed, mv = _version(client, ref)
    tags = mv.tags or {}
    lineage = {k[len(mc.LINEAGE_PREFIX):]: mc.untag_value(v) for k, v in tags.items() if k.startswith(mc.LINEAGE_PREFIX)}
    compat = {k[len(mc.COMPAT_PREFIX):]: mc.decode_fact(v) for k, v in tags.items() if k.startswith(mc.COMPAT_PREFIX)}
    sha = tags.get(mc.ADAPTER_SHA_TAG)
    local = _download(client, parsed.name, int(mv.version), sha, cache_dir)
    return ResolvedAdapter(name=parsed.name, version=int(mv.version), alias=parsed.alias, local_path=local,
                           base_model=lineage.get("base_model"), lineage=lineage, run_id=mv.run_id,
                           adapter_sha256=sha, compatibility=compat)


def lookup(tracking_uri: Any, ref: str) -> dict:
    """What the registry holds for `ref`, metadata only (nothing downloaded): version, base
    model and LoRA rank. The CLI and the operator look these up before resolving a serve spec."""
    _, mv = _version(mc.connect(tracking_uri), ref)
    tags = mv.tags or {}
    rank = mc.decode_fact(tags[mc.COMPAT_PREFIX + "r"]) if mc.COMPAT_PREFIX + "r" in tags else None
    base = tags.get(mc.LINEAGE_PREFIX + "base_model")
    return {"ref": ref, "version": int(mv.version), "base_model": mc.untag_value(base) if base is not None else None,
            "lora_rank": rank if isinstance(rank, int) else None}


def _version(client, ref: str):
    """(parsed ref, the MLflow ModelVersion it names); a clear RegistryError when there is none."""
    parsed = parse_ref(ref)
    if parsed.alias:
        from mlflow.exceptions import MlflowException

        try:
            return parsed, client.get_model_version_by_alias(parsed.name, parsed.alias)
        except MlflowException as exc:
            if not mc.is_not_found(exc) and "alias" not in str(exc).lower():
                raise
            rm = mc.get_registered_model(client, parsed.name)
            held = ", ".join(f"{a}=v{v}" for a, v in sorted((rm.aliases or {}).items())) or "none"
            raise RegistryError(f"{ref}: {parsed.name} has no alias {parsed.alias!r} (aliases: {held}); "
                                f"promote a version first: platformctl models promote {parsed.name} --version V --to {parsed.alias}") from exc
    return parsed, mc.get_version(client, parsed.name, parsed.version)


def _download(client, name: str, version: int, sha: str | None, cache_dir: str | Path | None) -> Path:
    """The version's files in the cache, downloaded once and checked against the recorded hash."""
    import mlflow.artifacts

    root = Path(cache_dir) if cache_dir else model_cache() / "adapters"
    final = root / name / f"v{version}-{(sha or 'unhashed')[:12]}"
    if final.is_dir() and sha and _sha_of(final) == sha:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    uri = mc.uri_of(client)
    # One downloader per version across threads and processes (replicas resolve concurrently):
    # the others wait, then reuse the finished copy instead of replacing it under a reader.
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir() and (_sha_of(final) == sha if sha else (final / "adapter_config.json").is_file()):
            return final
        with tempfile.TemporaryDirectory(prefix=".download-", dir=final.parent) as tmp:
            # Resolve the version's storage location with *this* client: a `models:/` URI would be
            # looked up in the process-wide default registry, not the one we were given.
            source = client.get_model_version_download_uri(name, str(version))
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri))
            if sha and _sha_of(got) != sha:
                raise RegistryError(f"{name} version {version}: downloaded adapter hash does not match the one recorded "
                                    f"at registration ({sha[:12]}); the artifact store copy is damaged, re-register it")
            shutil.rmtree(final, ignore_errors=True)  # a damaged copy; nobody else writes under the lock
            got.rename(final)  # same filesystem: atomic
    return final


def _sha_of(path: Path) -> str | None:
    try:
        return adapter_sha256(path, _adapter_files(path))
    except (RegistryError, OSError):
        return None
