"""Small builders shared by the data tests (a module, not conftest, so imports are unambiguous)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON lines; a str row is written verbatim (to make broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(*pairs: str, system: str | None = None) -> dict:
    """A chat record from alternating user/assistant texts."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(pairs)]
    return {"messages": messages}


def save_to_datasets_cache(cache_dir: Path, repo_id: str, splits: dict[str, list[dict]], commit: str = "c0ffee" + "0" * 34) -> Path:
    """Leave `repo_id`'s splits in a `datasets` cache as `load_dataset(repo_id)` from the Hub does.

    The Hub loader writes Arrow files under CACHE/OWNER___NAME/default/0.0.0/COMMIT/ with a
    dataset_info.json; offline, `load_dataset(repo_id)` finds the newest such directory. Here the
    Parquet builder writes the same files from local Parquet files (no Hub, no network); the
    directory is then moved under the owner's name, as a Hub download names it.
    """
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.load import configure_builder_class
    from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

    owner, name = repo_id.split("/")
    source = cache_dir.parent / f"{owner}-{name}-{commit[:8]}-parquet"
    source.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        columns = {key: [row.get(key) for row in rows] for row in rows for key in row}
        pq.write_table(pa.table(columns), source / f"{split}.parquet")
    files = DataFilesDict.from_patterns({s: [f"{s}.parquet"] for s in splits}, base_path=str(source))
    builder_cls = configure_builder_class(Parquet, builder_configs=[ParquetConfig(name="default", data_files=files)],
                                          default_config_name="default", dataset_name=name)
    builder = builder_cls(cache_dir=str(cache_dir), dataset_name=name, hash=commit)
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # CACHE/NAME/default/0.0.0/COMMIT
    target = cache_dir / f"{owner}___{name}" / "default" / "0.0.0" / commit
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(target))
    return target
