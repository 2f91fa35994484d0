"""Hugging Face datasets by name: `hf://datasets/OWNER/NAME?split=train&revision=main&config=NAME`.

`hub_rows(uri)` loads one split through `datasets.load_dataset`, so its cache
(`HF_DATASETS_CACHE`) and offline mode (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`) apply as they
do for any `datasets` user, and returns the rows as `RawRow`s located `index N` (0-based), so the
same record checks run as for local files. Query parameters: `split` (default `train`; a split
expression such as `train[:1000]` works too), `revision` (a branch, tag or commit; default the
dataset's main branch), `config` (the dataset's configuration name, when it has several).

Offline, `datasets` reuses the newest cached copy of the dataset whatever the revision; a
commit-hash `revision` is checked against the cached copy's commit, a branch or tag name cannot
be checked without the Hub. Paths with more components (`hf://datasets/OWNER/NAME/file.jsonl`)
are single files read through fsspec, like other URIs (see `sources`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from llmplatform.errors import DataError, Problem

PREFIX = "hf://datasets/"
QUERY_KEYS = ("split", "revision", "config")
SYNTAX = "hf://datasets/OWNER/NAME with optional ?split=SPLIT&revision=REV&config=NAME"
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face Hub and the part of it to read."""

    repo_id: str  # OWNER/NAME (or NAME for the few datasets without an owner)
    split: str = "train"
    revision: str | None = None
    config: str | None = None


def is_hub_dataset(uri: str | Path) -> bool:
    """True for `hf://datasets/OWNER/NAME[?...]` (a whole dataset), not for a file inside one."""
    text = str(uri)
    if not text.startswith(PREFIX):
        return False
    parts = [p for p in urlparse(text).path.split("/") if p]  # urlparse puts "datasets" in netloc
    return 1 <= len(parts) <= 2


def parse_hub_uri(uri: str) -> HubDataset:
    """The dataset, split, revision and config named by an `hf://datasets/...` URI; DataError if malformed."""
    parsed = urlparse(uri)
    repo_id = parsed.path.strip("/")
    problems = []
    if "@" in repo_id:
        name, _, rev = repo_id.partition("@")
        problems.append(Problem("(uri)", "a revision is given as a query parameter", uri, f"hf://datasets/{name}?revision={rev}"))
    query: dict[str, str] = {}
    for part in filter(None, parsed.query.split("&")):  # not parse_qsl: its "+" is a space, and `train+test` is a split
        key, _, value = (unquote(x) for x in part.partition("="))
        if key not in QUERY_KEYS:
            problems.append(Problem("(uri)", f"unknown query parameter '{key}'", uri, ", ".join(QUERY_KEYS)))
        elif not value:
            problems.append(Problem("(uri)", f"empty '{key}'", uri, f"{key}=VALUE or leave it out"))
        else:
            query[key] = value
    if not repo_id or repo_id.count("/") > 1:
        problems.append(Problem("(uri)", "not a dataset name", uri, SYNTAX))
    if problems:
        raise DataError(uri, problems)
    return HubDataset(repo_id, query.get("split", "train"), query.get("revision"), query.get("config"))


def _load_error(uri: str, ds: HubDataset, exc: Exception) -> DataError:
    """A `datasets` failure as a DataError that says where the cache is and how to fill it."""
    import datasets

    cache = str(datasets.config.HF_DATASETS_CACHE)
    fetch = (f"fetch it once where the Hub is reachable: `HF_DATASETS_CACHE={cache} python -c \"import datasets; "
             f"datasets.load_dataset('{ds.repo_id}'" + (f", '{ds.config}'" if ds.config else "")
             + (f", revision='{ds.revision}'" if ds.revision else "") + ")\"`, then copy that cache directory here")
    if datasets.config.HF_HUB_OFFLINE and isinstance(exc, ConnectionError):
        return DataError(uri, [Problem("(dataset)", f"dataset '{ds.repo_id}' is not in the datasets cache {cache} and offline mode is on "
                                       "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)", accepted=fetch + ", or turn offline mode off")])
    if isinstance(exc, ConnectionError):
        return DataError(uri, [Problem("(dataset)", f"could not reach the Hugging Face Hub for '{ds.repo_id}' and it is not in the datasets cache {cache}: {exc}",
                                       accepted=fetch)])
    return DataError(uri, [Problem("(dataset)", f"could not load '{ds.repo_id}': {type(exc).__name__}: {exc}",
                                   accepted="an existing dataset, revision and config")])


def load_split(uri: str):
    """The `datasets.Dataset` of the URI's split (from the cache when there is one); DataError otherwise."""
    import datasets

    ds = parse_hub_uri(uri)
    try:
        splits = datasets.load_dataset(ds.repo_id, ds.config, revision=ds.revision)
    except (ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:  # ConnectionError is an OSError
        raise _load_error(uri, ds, exc) from exc
    names = list(splits)
    wanted = {re.split(r"[\[(]", part, maxsplit=1)[0].strip() for part in ds.split.split("+")}
    if not wanted <= set(names):
        raise DataError(uri, [Problem("split", f"dataset '{ds.repo_id}' has no split {ds.split!r}", ds.split, ", ".join(names))])
    if ds.split in splits:
        table = splits[ds.split]
    else:  # a split expression: train[:100], train+test
        table = datasets.load_dataset(ds.repo_id, ds.config, revision=ds.revision, split=ds.split)
    _check_cached_revision(uri, ds, table)
    return table


def _check_cached_revision(uri: str, ds: HubDataset, table) -> None:
    """Offline, `datasets` takes the newest cached copy: refuse one from another commit than asked."""
    import datasets

    if not (datasets.config.HF_HUB_OFFLINE and ds.revision and COMMIT.fullmatch(ds.revision)):
        return
    cached = {Path(f["filename"]).parent.name for f in table.cache_files}
    if cached and ds.revision not in cached:
        raise DataError(uri, [Problem("revision", f"the cached copy of '{ds.repo_id}' is commit {', '.join(sorted(cached))}, not the revision asked for",
                                      ds.revision, "that commit fetched into the cache, or the cached commit as revision")])


def hub_rows(uri: str) -> list:
    """Every row of the URI's split as RawRow("index N", N, row)."""
    from llmplatform.data.sources import RawRow, without_nulls

    return [RawRow(f"index {i}", i, without_nulls(row)) for i, row in enumerate(load_split(uri))]


def rows_sha256(rows: list) -> str:
    """SHA-256 of the rows as canonical JSON lines: the lineage id of data that is not one file."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row.value, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return digest.hexdigest()
