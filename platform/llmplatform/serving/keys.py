"""API-key identities: who a key is and what it may use.

A keys file (the plan's `api_keys_file`; on Kubernetes the mounted API-key Secret) holds one key
per line, `#` starts a comment, and items may also be separated by commas:

    sha256:<64 hex> name=team-a rpm=60 tpm=20000
    sha256:<64 hex> name=batch-jobs
    sha256:<64 hex>
    plain-key-text name=dev

The first word is the key, stored as `sha256:<hex of SHA-256 of the key>` (a plain key is hashed
when read; prefer hashes). Optional attributes: `name=` (the identity in usage reports; default
`key-<first 8 hex of the hash>`), `rpm=` (requests per minute) and `tpm=` (prompt + completion
tokens per minute), both enforced across all ingress replicas of a deployment
(`llmplatform.serving.limits`). The older format, a bare key or hash per line, still works.
`platformctl keys add NAME --file FILE [--rpm N] [--tpm N]` makes a key, prints it once and
appends its hash line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
ATTRIBUTES = ("name", "rpm", "tpm")
COMMENT = re.compile(r"(^|\s)#.*$")  # `#` at the start of a word starts a comment
RECHECK_S = 1.0  # the keys file is stat'ed at most once a second (and at once for an unknown key)


class KeysFormatError(ValueError):
    """A keys file or env value that can't be read; the message names the line and the fix."""


@dataclass(frozen=True)
class KeyIdentity:
    """Who a key is: `name` for usage reports; `rpm`/`tpm` limits per minute (None: unlimited)."""

    name: str
    rpm: int | None = None
    tpm: int | None = None

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def default_name(key_hash: str) -> str:
    return f"key-{key_hash[:8]}"


def parse_item(item: str, where: str = "keys") -> tuple[str, KeyIdentity]:
    """One `KEY-OR-sha256:HEX [name=N] [rpm=N] [tpm=N]` item -> (hex hash, identity)."""
    words = item.split()
    key, attrs = words[0], {}
    for word in words[1:]:
        name, eq, value = word.partition("=")
        if not eq or name not in ATTRIBUTES or not value:
            raise KeysFormatError(f"{where}: {word!r} is not an attribute; write name=NAME, rpm=N or tpm=N after the key")
        attrs[name] = value
    if key.startswith("sha256:"):
        digest = key.removeprefix("sha256:").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeysFormatError(f"{where}: sha256: must be followed by 64 hex digits (the SHA-256 of the key)")
    else:
        digest = hash_key(key)
    limits = {}
    for field in ("rpm", "tpm"):
        if field in attrs:
            if not attrs[field].isdigit() or int(attrs[field]) < 1:
                raise KeysFormatError(f"{where}: {field}={attrs[field]} must be a whole number >= 1 (leave it out for no limit)")
            limits[field] = int(attrs[field])
    return digest, KeyIdentity(attrs.get("name") or default_name(digest), **limits)


def parse_keys_table(text: str, source: str = "keys") -> dict[str, KeyIdentity]:
    """Keys text (lines, or comma-separated items) -> {hex hash: identity}. All problems at once."""
    table, problems = {}, []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = COMMENT.sub("", line)
        for item in line.split(","):
            if not item.strip():
                continue
            try:
                digest, ident = parse_item(item, f"{source} line {lineno}")
            except KeysFormatError as exc:
                problems.append(str(exc))
                continue
            table[digest] = ident
    if problems:
        raise KeysFormatError("; ".join(problems))
    return table


def format_line(digest: str, ident: KeyIdentity) -> str:
    """The keys-file line for a hash and identity (what `platformctl keys add` appends)."""
    parts = [f"sha256:{digest}", f"name={ident.name}"]
    parts += [f"{f}={getattr(ident, f)}" for f in ("rpm", "tpm") if getattr(ident, f) is not None]
    return " ".join(parts)


def env_keys(auth) -> dict[str, KeyIdentity]:
    """Keys from `$auth.api_keys_env` of this process. Plain keys never leave this function."""
    if auth.api_keys_env and os.environ.get(auth.api_keys_env):
        return parse_keys_table(os.environ[auth.api_keys_env], f"${auth.api_keys_env}")
    return {}


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def add_key(path: Path, name: str, rpm: int | None = None, tpm: int | None = None, rotate: bool = False) -> str:
    """Make a new key, append its hash line to `path` (created 0600 if missing); returns the plain key.
    `rotate`: `name` must exist; the new key shares its identity (usage, and limits unless given)."""
    if not name or any(c.isspace() or c in ",#=" for c in name):
        raise KeysFormatError(f"key name {name!r}: use letters, digits, '-', '_' or '.' (no spaces, ',', '#', '=')")
    existing = parse_keys_table(path.read_text(), str(path)) if path.exists() else {}
    same = [ident for ident in existing.values() if ident.name == name]
    if same and not rotate:
        raise KeysFormatError(f"{path} already has a key named {name!r}; pick another name, or pass --rotate for a second key "
                              "of the same identity (then remove the old line)")
    if rotate and not same:
        raise KeysFormatError(f"--rotate: {path} has no key named {name!r} to rotate")
    if same:
        rpm, tpm = rpm if rpm is not None else same[0].rpm, tpm if tpm is not None else same[0].tpm
    key = new_key()
    line = format_line(hash_key(key), KeyIdentity(name, rpm, tpm))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        if path.stat().st_size and not path.read_text().endswith("\n"):
            fh.write("\n")
        fh.write(line + "\n")
    return key


class KeysFile:
    """The plan's API-key file (`api_keys_file`: the spec's, or on Kubernetes the mounted Secret),
    read at replica start and again when it changes: a rotated Secret reaches a running replica
    once the kubelet refreshes the volume (about a minute), no restart needed. The file is stat'ed
    at most every RECHECK_S per lookup (a request costs no syscall), and at once when a key is not
    in it, so a newly added key works on its first request and a removed one stops within
    RECHECK_S. A missing file holds no keys (logged)."""

    def __init__(self, path: str | None):
        self.path = Path(path).expanduser() if path else None
        self._seen: tuple | None = None
        self._checked = float("-inf")  # time.monotonic() of the last stat
        self._table: dict[str, KeyIdentity] = {}
        self._lock = threading.Lock()

    def table(self, force: bool = False) -> dict[str, KeyIdentity]:
        if self.path is None:
            return {}
        now = time.monotonic()
        if not force and now - self._checked < RECHECK_S:
            return self._table
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()  # follows the Secret volume's ..data symlink: a new inode per update
                seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                seen = None
            if seen != self._seen:
                if seen is None:
                    log.warning("API-key file %s is missing: no keys from it", self.path)
                self._table = parse_keys_table(self.path.read_text(), str(self.path)) if seen is not None else {}
                self._seen = seen
            return self._table

    def hashes(self) -> set[str]:
        return set(self.table())

    def lookup(self, digest: str) -> KeyIdentity | None:
        ident = self.table().get(digest)
        if ident is None:  # perhaps just added: look again now (a stat, ~2 us)
            ident = self.table(force=True).get(digest)
        return ident


def parse_keys(text: str, sep: str = "\n") -> set[str]:
    """Hex hashes of the keys in `text` (identities dropped)."""
    return set(parse_keys_table(text.replace(sep, "\n") if sep != "\n" else text))
