"""What `platformctl models list` and `models show` print, as plain dicts (JSON-ready).

`list_models` gives one row per registered model: versions, aliases, base model and the key
eval metrics of its latest version. `show_model` gives one model in full: a version's lineage
(run id and UI link, dataset hash, base model, spec, git sha), metrics, adapter config (rank,
alpha, target modules), compatibility facts, the aliases it holds, and the promotion history.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from llmplatform.registry import client as mc
from llmplatform.registry.canary import canaries
from llmplatform.registry.history import read_events
from llmplatform.registry.promote import version_metrics

KEY_METRICS = 4  # eval metrics shown per model in `models list`


def list_models(tracking_uri: Any, name_contains: str | None = None) -> list[dict]:
    """One summary dict per registered model, sorted by name."""
    client = mc.connect(tracking_uri)
    rows = []
    for rm in _all_registered_models(client, name_contains):
        versions = _versions(client, rm.name)
        latest = versions[-1] if versions else None
        lineage = _lineage(latest) if latest else {}
        rows.append({
            "name": rm.name,
            "versions": len(versions),
            "latest": int(latest.version) if latest else None,
            "aliases": {a: int(v) for a, v in sorted((rm.aliases or {}).items())},
            "base_model": lineage.get("base_model"),
            "metrics": key_metrics(version_metrics(client, latest)) if latest else {},
            "created": iso(rm.creation_timestamp),
        })
    return rows


def show_model(tracking_uri: Any, name: str, version: int | str | None = None) -> dict:
    """One registered model in full; `version` picks the detailed version (default: the latest)."""
    client = mc.connect(tracking_uri)
    uri = mc.uri_of(client)
    rm = mc.get_registered_model(client, name)
    versions = _versions(client, name)
    held = _aliases_by_version(rm)
    mv = mc.get_version(client, name, version) if version is not None else (versions[-1] if versions else None)
    return {
        "name": name,
        "description": (rm.description or "").split("<!--")[0].strip(),
        "created": iso(rm.creation_timestamp),
        "url": mc.model_url(uri, name),
        "aliases": {a: int(v) for a, v in sorted((rm.aliases or {}).items())},
        "versions": [{"version": int(v.version), "aliases": held.get(int(v.version), []), "created": iso(v.creation_timestamp),
                      "status": v.status, "run_id": v.run_id} for v in versions],
        "version": version_detail(client, uri, mv, held) if mv is not None else None,
        "history": [e.to_dict() for e in read_events(rm)],
        "canaries": canaries(rm),
    }


def version_detail(client, uri: str, mv, held: dict[int, list[str]]) -> dict:
    """Lineage, metrics, adapter config and compatibility of one version."""
    from mlflow.exceptions import MlflowException

    tags = mv.tags or {}
    compat = {k[len(mc.COMPAT_PREFIX):]: mc.decode_fact(v) for k, v in tags.items() if k.startswith(mc.COMPAT_PREFIX)}
    experiment_id = None
    if mv.run_id:
        try:
            experiment_id = client.get_run(mv.run_id).info.experiment_id
        except MlflowException:
            experiment_id = None  # the run was deleted; the version's tags still tell its lineage
    return {
        "version": int(mv.version),
        "status": mv.status,
        "created": iso(mv.creation_timestamp),
        "aliases": held.get(int(mv.version), []),
        "source": mv.source,
        "run_id": mv.run_id,
        "run_url": mc.run_url(uri, experiment_id, mv.run_id),
        "url": mc.model_url(uri, mv.name, int(mv.version)),
        "lineage": _lineage(mv),
        "metrics": version_metrics(client, mv),
        "adapter": {k: compat.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "adapter_base_model")},
        "compatibility": compat,
        "adapter_sha256": tags.get(mc.ADAPTER_SHA_TAG),
        "description": mv.description,
    }


def key_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The eval metrics worth a column (all metrics when none is named eval*)."""
    chosen = {k: v for k, v in sorted(metrics.items()) if k.startswith("eval")} or dict(sorted(metrics.items()))
    return dict(list(chosen.items())[:KEY_METRICS])


def iso(ms: int | None) -> str | None:
    """MLflow's epoch milliseconds as ISO 8601 UTC."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _lineage(mv) -> dict:
    return {k[len(mc.LINEAGE_PREFIX):]: mc.untag_value(v) for k, v in (mv.tags or {}).items() if k.startswith(mc.LINEAGE_PREFIX)}


def _aliases_by_version(rm) -> dict[int, list[str]]:
    held: dict[int, list[str]] = {}
    for alias, v in sorted((rm.aliases or {}).items()):
        held.setdefault(int(v), []).append(alias)
    return held


def _versions(client, name: str) -> list:
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version))


def _all_registered_models(client, name_contains: str | None) -> list:
    flt = f"name LIKE '%{name_contains}%'" if name_contains else None
    models, token = [], None
    while True:
        page = client.search_registered_models(filter_string=flt, max_results=100, page_token=token)
        models += list(page)
        token = page.token
        if not token:
            return sorted(models, key=lambda m: m.name)
