"""Reading datasets: local paths, `file://` and object-store URIs, and Hugging Face datasets, into raw rows.

A dataset is one JSONL, JSON (an array, or JSON lines) or Parquet file, or a Hugging Face
dataset named `hf://datasets/OWNER/NAME?split=...&revision=...` (loaded through `datasets`,
see `hub`). `read_source` returns the rows and the data's SHA-256 for either. `read_rows` returns
every row with its location (`line N`, 1-based, for JSON lines; `index N`, 0-based, for JSON
arrays and Parquet; Parquet's null fields are left out) and the raw value, or a parse error for that line, so the caller can report
every bad line at once. Object-store URIs (s3://, gs://, ...) go through fsspec, then
pyarrow.fs; when neither can open the scheme the error names the library to install.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from llmplatform.data.hub import hub_rows, is_hub_dataset, rows_sha256
from llmplatform.errors import DataError, Problem

PARQUET_MAGIC = b"PAR1"
FS_LIBRARY = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


@dataclass(frozen=True)
class RawRow:
    """One row as read: where it is, its 1-based line (JSON lines) or 0-based index, and its value."""

    location: str  # "line 12" or "index 3"
    number: int
    value: Any = None
    error: str | None = None  # set when the row could not be parsed (invalid JSON)


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` strings other than local Windows drive letters."""
    scheme = urlparse(str(path)).scheme
    return len(scheme) > 1


def local_path(path: str | Path) -> Path | None:
    """The local filesystem path for a plain path or a `file://` URI; None for remote URIs."""
    text = str(path)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if is_uri(text):
        return None
    return Path(text).expanduser()


def read_bytes(path: str | Path) -> bytes:
    """The whole file at a local path or URI; DataError when it cannot be read."""
    if is_hub_dataset(path):
        raise DataError(str(path), [Problem("(file)", "a Hugging Face dataset is not one file", str(path),
                                            "read_source(), which loads it through `datasets`")])
    local = local_path(path)
    if local is not None:
        if not local.is_file():
            raise DataError(str(path), [Problem("(file)", "file not found", str(path), "a readable JSONL, JSON or Parquet file")])
        return local.read_bytes()
    return _read_remote(str(path))


def _read_remote(uri: str) -> bytes:
    scheme = urlparse(uri).scheme
    try:
        import fsspec
    except ImportError:
        fsspec = None
    fsspec_problem = None
    if fsspec is not None:
        try:
            with fsspec.open(uri, "rb") as fh:
                return fh.read()
        except (ImportError, ValueError) as exc:  # no implementation installed for this scheme
            fsspec_problem = str(exc)
        except FileNotFoundError:
            raise DataError(uri, [Problem("(file)", "object not found", uri)]) from None
        except OSError as exc:
            raise DataError(uri, [Problem("(file)", f"could not read: {exc}", uri)]) from exc
    if scheme in ("s3", "gs", "gcs"):
        try:
            return _read_pyarrow(uri)
        except ImportError:
            pass
        except (OSError, ValueError) as exc:
            raise DataError(uri, [Problem("(file)", f"could not read through pyarrow.fs: {exc}", uri,
                                          f"check the URI and credentials, or `pip install {FS_LIBRARY[scheme]}`")]) from exc
    lib = FS_LIBRARY.get(scheme, f"an fsspec implementation for '{scheme}://'")
    detail = f" ({fsspec_problem})" if fsspec_problem else ""
    raise DataError(uri, [Problem("(file)", f"no filesystem library can read '{scheme}://' URIs here{detail}",
                                  uri, f"`pip install {lib}`, or copy the file locally and pass its path")])


def _read_pyarrow(uri: str) -> bytes:
    """Read with pyarrow's built-in S3/GCS filesystems, with short timeouts (no long retry loops)."""
    from datetime import timedelta

    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    inner = f"{parsed.netloc}{parsed.path}"
    if parsed.scheme == "s3":
        fs = pafs.S3FileSystem(connect_timeout=5, request_timeout=15)
    else:
        fs = pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=10))
    with fs.open_input_stream(inner) as fh:
        return fh.read()


def read_source(path: str | Path, data: bytes | None = None) -> tuple[list[RawRow], str]:
    """(rows, hex SHA-256) of a data file, or of an `hf://datasets/...` split (its rows' SHA-256)."""
    if is_hub_dataset(path):
        rows = hub_rows(str(path))
        return rows, rows_sha256(rows)
    data = read_bytes(path) if data is None else data
    return read_rows(path, data), hashlib.sha256(data).hexdigest()


def dataset_sha256(path: str | Path) -> str:
    """The dataset's lineage id: hex SHA-256 of the file's bytes (local path or URI), or of an
    `hf://datasets/...` split's rows as canonical JSON lines (see `hub.rows_sha256`)."""
    if is_hub_dataset(path):
        return rows_sha256(hub_rows(str(path)))
    local = local_path(path)
    if local is not None and local.is_file():
        digest = hashlib.sha256()
        with open(local, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    return hashlib.sha256(read_bytes(path)).hexdigest()


def file_kind(path: str | Path, data: bytes) -> str:
    """`parquet`, `json` or `jsonl`, from the extension, else from the content."""
    name = str(path).lower().split("?")[0]
    if data[:4] == PARQUET_MAGIC or name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".jsonlines")):
        return "jsonl"
    return "json"


def read_rows(path: str | Path, data: bytes | None = None) -> list[RawRow]:
    """Every row of the file, in order, with its location; unparseable lines carry `error`."""
    data = read_bytes(path) if data is None else data
    kind = file_kind(path, data)
    if kind == "parquet":
        return _parquet_rows(path, data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":  # a JSON array: no record boundaries to recover
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(str(path), [Problem(f"line {line}", "not UTF-8 text", accepted="a UTF-8 JSONL, JSON or Parquet file")]) from exc
        return _jsonl_rows(_decode_lines(data))  # JSON lines: report each bad line, check the rest
    if kind == "json":
        stripped = text.lstrip()
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if stripped.startswith("["):  # a broken array: no record boundaries to recover
                raise DataError(str(path), [Problem(f"line {exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})")]) from None
            whole = None
        if isinstance(whole, list):
            return [RawRow(f"index {i}", i, value) for i, value in enumerate(whole)]
        if whole is not None:  # one JSON document holding a single record
            return [RawRow("line 1", 1, whole)]
    return _jsonl_rows(text)


def _decode_lines(data: bytes) -> list[str | UnicodeDecodeError]:
    """Each line of `data` as text, or the UnicodeDecodeError of a line that is not UTF-8."""
    lines: list[str | UnicodeDecodeError] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            lines.append(exc)
    return lines


def _jsonl_rows(lines: str | list[str | UnicodeDecodeError]) -> list[RawRow]:
    rows = []
    for number, line in enumerate(lines.splitlines() if isinstance(lines, str) else lines, start=1):
        if isinstance(line, UnicodeDecodeError):
            byte = line.object[line.start]
            rows.append(RawRow(f"line {number}", number, error=f"not UTF-8 text (byte 0x{byte:02x} at column {line.start + 1}); save the file as UTF-8"))
            continue
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        try:
            rows.append(RawRow(f"line {number}", number, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append(RawRow(f"line {number}", number, error=f"invalid JSON: {exc.msg} (column {exc.colno})"))
    return rows


def _parquet_rows(path: str | Path, data: bytes) -> list[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError) for bad files
        raise DataError(str(path), [Problem("(file)", f"not a readable Parquet file: {exc}")]) from exc
    return [RawRow(f"index {i}", i, without_nulls(value)) for i, value in enumerate(table.to_pylist())]


def without_nulls(value: Any) -> Any:
    """`value` without null fields, at every depth: Arrow gives every row every column (and every
    message every key any message has), so a field a row lacks reads as None; here it is absent."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value
