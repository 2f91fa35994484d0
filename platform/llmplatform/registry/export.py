"""`platformctl models export`: a registered adapter as a merged checkpoint, a GGUF file or the peft folder.

The version is resolved and its adapter downloaded and verified as serving does (`registry.resolve`);
the base comes from the version's lineage (`base_model`). The export is written to a staging folder
beside `out` and renamed into place when complete, so `out` is either absent or whole. Its
`export.json` carries the lineage (reference, version, base, adapter hash, file hashes). With
`register`, the folder is logged as an artifact of the version's run (`exports/<format>-<time>`) and
the version gets a tag `export.<format>` pointing at it with the same facts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from llmplatform.errors import RegistryError
from llmplatform.registry import client as mc
from llmplatform.registry.resolve import resolve

FORMATS = ("merged", "gguf", "adapter")


def export(tracking_uri: Any, ref: str, fmt: str, out: str | Path, *, dtype: str = "auto", gguf_type: str = "bf16",
           register: bool = True, base_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> dict:
    """Export `ref` (models:/NAME@ALIAS or models:/NAME/VERSION) as `fmt` into the new folder `out`;
    returns the export record (also written as `out/export.json`)."""
    from llmplatform import basemodels
    from llmplatform.export import gguf as gguf_export

    if fmt not in FORMATS:
        raise RegistryError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "gguf" and gguf_type not in gguf_export.FORMATS:
        raise RegistryError(f"--gguf-type {gguf_type!r} is not one of {', '.join(gguf_export.FORMATS)}")
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RegistryError(f"--out {out} exists and is not an empty folder; name a new folder (nothing was written)")
    adapter = resolve(tracking_uri, ref, cache_dir)
    if base_dir is None and not adapter.base_model:
        raise RegistryError(f"{ref} (version {adapter.version}) records no base_model in its lineage; pass --base DIR")
    base = str(base_dir) if base_dir is not None else basemodels.locate(adapter.base_model)
    staging = out.parent / f".{out.name}.export-{int(time.time() * 1000)}"
    staging.mkdir(parents=True)
    try:
        _write(fmt, adapter, base, staging, dtype, gguf_type)
        record = {
            "ref": ref, "name": adapter.name, "version": adapter.version, "format": fmt,
            "gguf_type": gguf_type if fmt == "gguf" else None, "dtype": dtype if fmt == "merged" else None,
            "base_model": adapter.base_model, "base_location": base, "adapter_sha256": adapter.adapter_sha256,
            "run_id": adapter.run_id, "lineage": adapter.lineage,
            "files": {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / "export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record["out"] = str(out)
    record["artifact"] = _register(tracking_uri, adapter, fmt, out, record) if register else None
    return record


def _write(fmt: str, adapter, base: str, staging: Path, dtype: str, gguf_type: str) -> None:
    from llmplatform.export import gguf as gguf_export
    from llmplatform.export import merge

    if fmt == "adapter":
        for f in adapter.local_path.iterdir():
            if f.is_file():
                shutil.copy2(f, staging / f.name)
        return
    model = merge.merged_model(base, adapter.local_path, dtype)
    if fmt == "merged":
        merge.save_merged(model, base, staging)
    else:
        gguf_export.write_gguf(model, base, staging / f"{adapter.name}-v{adapter.version}-{gguf_type}.gguf", gguf_type,
                               name=f"{adapter.name} v{adapter.version}")


def _register(tracking_uri: Any, adapter, fmt: str, out: Path, record: dict) -> str | None:
    """Log `out` under the version's run and tag the version; a failure here leaves the local export whole."""
    client = mc.connect(tracking_uri)
    artifact_path = f"exports/{fmt}-{record['created'].replace(':', '').replace('-', '')}"
    try:
        if adapter.run_id:
            client.log_artifacts(adapter.run_id, str(out), artifact_path)
        uri = f"runs:/{adapter.run_id}/{artifact_path}" if adapter.run_id else None
        tag = {"artifact": uri, "files": record["files"], "created": record["created"], "base_model": record["base_model"],
               "gguf_type": record["gguf_type"], "dtype": record["dtype"]}
        client.set_model_version_tag(adapter.name, str(adapter.version), f"export.{fmt}", json.dumps(tag, sort_keys=True))
        return uri
    except Exception as exc:
        raise RegistryError(f"the export in {out} is complete, but recording it on {adapter.name} version {adapter.version} "
                            f"failed: {exc}; run again with --no-register to skip recording") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
