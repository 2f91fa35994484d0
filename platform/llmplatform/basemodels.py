"""What a spec's base-model name means: the one entry point from cluster code to `llama2-tiny`.

`locate(name_or_path)` is what `from_pretrained` should load: an existing directory -> itself
(resolved), a tiny name (`llama2-tiny`, `llama2-tiny-base`, `llama2-tiny-random`) -> its cached
checkpoint (built on first use by `llmplatform.tiny`), a Llama 2 catalog name -> its HF id,
anything else -> unchanged (taken as an HF id or a path the loader will report on).
`identity(name)` is the same without building anything (registry compatibility checks compare
it), `tokenizer_location(name)` where the tokenizer of `name` lies (every tiny kind shares the
random checkpoint's, which builds in seconds). Only this module imports `llmplatform.tiny` on
behalf of training, serving, registry, data and backends (tests/unit/test_layering.py).
"""

from __future__ import annotations

from pathlib import Path

TINY_NAMES = {"llama2-tiny": "base", "llama2-tiny-base": "base", "llama2-tiny-random": "random"}  # name -> tiny kind


def locate(name_or_path: str, cache: Path | str | None = None) -> str:
    """The directory or HF id to load for `name_or_path` (see the module docstring)."""
    name = str(name_or_path)
    if name in TINY_NAMES:
        from llmplatform.tiny.cache import ensure_tiny_model

        return str(ensure_tiny_model(TINY_NAMES[name], cache))
    return _directory_or_catalog(name)


def identity(name: str) -> str:
    """What `locate(name)` points at, without building or downloading anything."""
    if name in TINY_NAMES:
        from llmplatform.tiny.cache import checkpoint_dir

        return str(checkpoint_dir(TINY_NAMES[name]).resolve())
    return _directory_or_catalog(name)


def tokenizer_location(name: str) -> str:
    """Where the tokenizer of `name` lies; for a tiny name the random kind's (seconds to build),
    so the pretrained `base` (minutes) is not built just to read its tokenizer."""
    if name in TINY_NAMES:
        from llmplatform.tiny.cache import ensure_tiny_model

        return str(ensure_tiny_model("random"))
    return locate(name)


def _directory_or_catalog(name: str) -> str:
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    from llmplatform.catalog import CATALOG

    entry = CATALOG.get(name)
    return entry.hf_id if entry is not None and entry.hf_id else name
