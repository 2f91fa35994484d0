"""Build `llama2-tiny` checkpoints once and keep them in the model cache.

`ensure_tiny_model(kind)` returns `<cache>/llama2-tiny-<kind>-<key>/`, an HF checkpoint dir.
The key is a digest of everything the files depend on (tokenizer corpus and settings, model
shape, pretraining recipe), so a changed recipe builds a new directory instead of reusing a
stale one. Builds happen in a temporary directory inside the cache and are renamed into place
under an exclusive file lock, so concurrent callers (Ray workers, parallel tests) never see a
half-written checkpoint and only one of them does the work.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from llmplatform import paths
from llmplatform.errors import PlatformError
from llmplatform.tiny import model as tiny_model
from llmplatform.tiny import tokenizer as tiny_tok

KINDS = ("random", "base")
MANIFEST = "tiny.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                  "chat_template.jinja", MANIFEST)


@functools.lru_cache(maxsize=None)
def recipe_key(kind: str) -> str:
    """Content key of a kind's recipe: 16 hex digits."""
    _check_kind(kind)
    h = hashlib.sha256(tiny_tok.recipe_key().encode())
    h.update(json.dumps(tiny_model.hf_config_dict(), sort_keys=True).encode())
    h.update(f"seed={tiny_model.SEED}".encode())
    if kind == "base":
        from llmplatform.tiny import pretrain

        h.update(pretrain.recipe_key().encode())
    return h.hexdigest()[:16]


def checkpoint_dir(kind: str, cache: Path | None = None) -> Path:
    """Where `kind` lives (built or not)."""
    root = Path(cache) if cache is not None else paths.model_cache()
    return root / f"llama2-tiny-{kind}-{recipe_key(kind)}"


def is_complete(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in REQUIRED_FILES)


def ensure_tiny_model(kind: str = "base", cache: Path | str | None = None, log=None) -> Path:
    """Return the checkpoint dir for `kind` ("random" or "base"), building it if missing.

    `log` (e.g. `print`) receives pretraining progress when "base" is built.
    """
    _check_kind(kind)
    root = Path(cache).expanduser().resolve() if cache is not None else paths.model_cache()
    final = checkpoint_dir(kind, root)
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{final.name}.lock"):
        if is_complete(final):  # another process built it while we waited
            return final
        for stale in root.glob(f".build-{final.name}-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            started = time.monotonic()
            digest = _build(kind, tmp, root, log)
            manifest = {"name": tiny_model.NAME, "kind": kind, "key": recipe_key(kind),
                        "weights_sha256": digest,
                        "build_seconds": round(time.monotonic() - started, 2)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():  # an incomplete leftover from a killed build
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def generate_all(cache: Path | str | None = None, log=print) -> dict[str, Path]:
    """Build (or find) every kind; report each one's path and time through `log`."""
    out = {}
    for kind in KINDS:
        started = time.monotonic()
        log(f"llama2-tiny {kind}: building or reusing ...")
        out[kind] = ensure_tiny_model(kind, cache, log=log)
        log(f"llama2-tiny {kind}: {out[kind]} ({time.monotonic() - started:.1f} s)")
    return out


def _build(kind: str, out: Path, root: Path, log) -> str:
    if kind == "random":
        tok_bytes = tiny_tok.train_model_bytes()
        model = tiny_model.random_model()
    else:
        from llmplatform.tiny import pretrain

        random_dir = ensure_tiny_model("random", root)
        tok_bytes = (random_dir / "tokenizer.model").read_bytes()
        model = pretrain.pretrain(random_dir, log=log)
    tiny_tok.write_tokenizer(out, tiny_model.shape()["context"], tok_bytes)
    tiny_model.save_checkpoint(model, out)
    return tiny_model.weights_digest(model)


@contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PlatformError(f"llama2-tiny kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
