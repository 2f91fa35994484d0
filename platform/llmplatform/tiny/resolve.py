"""Map a spec's base-model name to what `from_pretrained` should load.

`llama2-tiny` -> the pretrained tiny checkpoint (built on first use), `llama2-tiny-random` ->
the random-init one, an existing directory -> itself, a Llama 2 catalog name -> its HF id,
anything else -> unchanged (taken as an HF id or a path the loader will report on).
"""

from __future__ import annotations

from pathlib import Path

TINY_NAMES = {"llama2-tiny": "base", "llama2-tiny-base": "base", "llama2-tiny-random": "random"}


def resolve_base(name_or_path: str, cache: Path | str | None = None) -> str:
    """The directory or HF id for `name_or_path` (see the module docstring)."""
    name = str(name_or_path)
    if name in TINY_NAMES:
        from llmplatform.tiny.cache import ensure_tiny_model

        return str(ensure_tiny_model(TINY_NAMES[name], cache))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    try:
        from llmplatform import catalog
    except ImportError:
        return name
    entry = catalog.CATALOG.get(name)
    return entry.hf_id if entry is not None and entry.hf_id else name
