"""A thin adapter over `mlflow.MlflowClient`: connection, tag prefixes, URLs, error mapping.

Everything that talks to MLflow goes through a client made here, so the tracking URI is chosen
in one place and MLflow's exceptions become `RegistryError`s that name the model and the fix.
MLflow is imported lazily: importing the registry package (or the CLI) stays cheap.
"""

from __future__ import annotations

import json
from typing import Any

from llmplatform.errors import RegistryError

TAG_PREFIX = "platform."            # every tag this package writes starts with it
LINEAGE_PREFIX = "platform.lineage."    # version tags: lineage given at registration
COMPAT_PREFIX = "platform.compat."      # version tags: compatibility facts checked at registration
ADAPTER_SHA_TAG = "platform.adapter_sha256"
EVENT_PREFIX = "platform.promotion."    # registered-model tags: one per promotion/rollback event
MAX_TAG_VALUE = 100_000                 # MLflow's model-registry tag value limit (characters)


def connect(tracking_uri: Any = None):
    """An `MlflowClient` for `tracking_uri` (a URI string; None: `default_tracking_uri()`).

    An existing client is passed through, so callers may hand in either.
    """
    from mlflow import MlflowClient

    if isinstance(tracking_uri, MlflowClient):
        return tracking_uri
    uri = str(tracking_uri) if tracking_uri else default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when missing. Two jobs submitted at once to a fresh
    server both find no experiment and both create it: the loser's RESOURCE_ALREADY_EXISTS is not
    an error, it reads the winner's experiment."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:  # deleted in between: nothing sensible to pick
            raise
        return exp.experiment_id


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else a RegistryError saying how to name a server. (The registry
    never asks the local stack: `platformctl models` passes the stack's server explicitly.)"""
    import os

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise RegistryError("no MLflow tracking server given: pass a tracking URI (`--tracking-uri`), set MLFLOW_TRACKING_URI, "
                        "or run `platformctl up` and use platformctl, which finds the local stack's server")


def uri_of(client) -> str:
    return str(client._registry_uri if hasattr(client, "_registry_uri") else client.tracking_uri)


def is_not_found(exc: Exception) -> bool:
    """True for MLflow's RESOURCE_DOES_NOT_EXIST (whatever the store behind the server)."""
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def is_already_exists(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def get_registered_model(client, name: str):
    """The registered model, or a RegistryError that lists what exists."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if is_not_found(exc):
            known = sorted(m.name for m in client.search_registered_models(max_results=50))
            raise RegistryError(f"no registered model named {name!r} (registered: {', '.join(known) or 'none'})") from exc
        raise


def get_version(client, name: str, version: int | str):
    """One model version, or a RegistryError that lists the versions that exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if is_not_found(exc):
            get_registered_model(client, name)  # a missing model gets its own message
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            raise RegistryError(f"{name} has no version {version} (versions: {', '.join(map(str, versions)) or 'none'})") from exc
        raise


def alias_holder(client, name: str, alias: str) -> int | None:
    """The version number holding `alias` on `name` right now, or None."""
    aliases = get_registered_model(client, name).aliases or {}
    holder = aliases.get(alias)
    return int(holder) if holder is not None else None


def run_metrics(client, run_id: str | None) -> dict[str, float]:
    """The latest value of every metric a run logged ({} for no run or a deleted one)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException as exc:
        if is_not_found(exc):
            return {}
        raise


def run_url(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The MLflow UI address of a run, for http(s) tracking servers."""
    if not run_id or not experiment_id or not str(tracking_uri).startswith(("http://", "https://")):
        return None
    return f"{str(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def model_url(tracking_uri: str, name: str, version: int | None = None) -> str | None:
    if not str(tracking_uri).startswith(("http://", "https://")):
        return None
    base = f"{str(tracking_uri).rstrip('/')}/#/models/{name}"
    return f"{base}/versions/{version}" if version is not None else base


def tag_value(value: Any) -> str:
    """A tag value as text: strings as they are, anything else as compact JSON."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    if len(text) > MAX_TAG_VALUE:
        raise RegistryError(f"tag value of {len(text)} characters exceeds MLflow's limit of {MAX_TAG_VALUE}; shorten it")
    return text


def untag_value(text: str) -> Any:
    """The inverse of `tag_value` for JSON objects and lists; every other value stays a string."""
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def decode_fact(text: str) -> Any:
    """A compatibility fact back to its type: JSON where it parses (8, true, [..]), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text
