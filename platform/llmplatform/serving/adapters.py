"""Which model or adapter a request's `model` names, and following registry promotions.

A deployment serves one base and any number of LoRA adapters. Requests name the base, an adapter
listed in the spec (`BASE:ADAPTER` or just `ADAPTER`), a registered version (`NAME/VERSION`) or an
alias (`NAME@ALIAS`, e.g. `support-bot@production`); the deployment name itself means the spec's
`model.registry` adapter when one is set, else the base. Aliases are re-resolved every
`registry_poll_s`: when `platformctl models promote` moves one, new requests get the new version
(a new multiplexed adapter id, loaded lazily) while requests already running finish on the old one.
A version whose adapter does not fit the base is refused, and a moved alias that points at one
keeps serving the previous version.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmplatform.errors import PlatformError
from llmplatform.specs import REGISTRY_URI, ServeSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What a request runs on. adapter_id None = the base model."""

    model: str  # the name the client used (echoed in responses)
    adapter_id: str | None = None  # multiplexed id: "NAME/VERSION" or "local:NAME"
    adapter_path: str | None = None
    version: int | None = None


class TargetError(PlatformError):
    """A request names a model we can't serve. status 404 unknown, 400 incompatible."""

    def __init__(self, message: str, status: int = 404, code: str = "model_not_found"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class _Followed:
    """A registry reference the deployment serves, and the version it currently resolves to."""

    ref: str  # models:/NAME@ALIAS or models:/NAME/VERSION
    target: Target | None = None
    refused: dict[int, str] = field(default_factory=dict)  # version -> why it was refused


def registry_ref(name: str) -> str | None:
    """`NAME@ALIAS`, `NAME/VERSION` or `models:/...` as a registry URI, else None."""
    uri = name if name.startswith("models:/") else f"models:/{name}"
    return uri if REGISTRY_URI.match(uri) else None


def default_resolver(tracking_uri: str | None) -> Callable[[str], object]:
    """`ref -> ResolvedAdapter` through llmplatform.registry (downloads the adapter folder)."""
    def resolve(ref: str):
        from llmplatform import registry

        try:
            return registry.resolve(tracking_uri, ref)
        except TypeError:
            return registry.resolve(ref, tracking_uri=tracking_uri)
    return resolve


def default_base_resolver(name: str) -> str:
    from llmplatform.basemodels import locate

    return locate(name)


def locate_base(name: str) -> str:
    """Where the resolved base model's weights are (a directory or an HF id) on this node."""
    return default_base_resolver(str(name))


class AdapterTable:
    """Maps request model names to Targets; follows aliases. Thread-safe; all I/O is injected."""

    def __init__(self, spec: ServeSpec, base_name: str, base_dir: str, resolver: Callable[[str], object] | None = None,
                 check: Callable[[str, str], list[str]] | None = None):
        self.spec = spec
        self.base_name = base_name
        self.base_dir = base_dir
        self._resolve = resolver or default_resolver(spec.tracking_uri)
        self._check = check or _check_fit
        self._lock = threading.Lock()
        self.static: dict[str, Target | _Followed] = {}
        for a in spec.model.adapters:
            ref = registry_ref(a.source) if a.source.startswith("models:/") else None
            if ref:
                self.static[a.name] = _Followed(ref)
            else:
                self.static[a.name] = Target(a.name, f"local:{a.name}", str(Path(a.source).expanduser()))
        self.default = _Followed(spec.model.registry) if spec.model.registry else None
        self.dynamic: dict[str, _Followed] = {}

    # ------------------------------------------------------------------ lookups

    def names(self) -> list[dict]:
        """What /v1/models lists: the base, listed adapters, followed registry references."""
        rows = [{"id": self.base_name, "kind": "base"}]
        if self.spec.name != self.base_name:
            rows.append({"id": self.spec.name, "kind": "deployment",
                         "version": self.default.target.version if self.default and self.default.target else None})
        for name, entry in self.static.items():
            tgt = entry.target if isinstance(entry, _Followed) else entry
            rows.append({"id": f"{self.base_name}:{name}", "kind": "adapter",
                         "version": tgt.version if tgt else None,
                         "source": entry.ref if isinstance(entry, _Followed) else tgt.adapter_path})
        for ref, entry in sorted(self.followed().items()):
            rows.append({"id": ref.removeprefix("models:/"), "kind": "registry",
                         "version": entry.target.version if entry.target else None})
        return rows

    def followed(self) -> dict[str, _Followed]:
        out = {f.ref: f for f in self.static.values() if isinstance(f, _Followed)}
        if self.default:
            out[self.default.ref] = self.default
        out.update(self.dynamic)
        return out

    def lookup(self, model: str) -> Target:
        """The Target for a request's `model`; raises TargetError (404 unknown, 400 incompatible)."""
        name = model.strip()
        if name == self.base_name or (name == self.spec.name and not self.default):
            return Target(model)
        if name == self.spec.name and self.default:
            return self._current(self.default, model)
        short = name.split(":", 1)[1] if name.startswith(self.base_name + ":") else name
        if short in self.static:
            entry = self.static[short]
            return self._current(entry, model) if isinstance(entry, _Followed) else Target(model, entry.adapter_id, entry.adapter_path)
        ref = registry_ref(short)
        if ref:
            with self._lock:
                entry = self.followed().get(ref)
                if entry is None:
                    if not self.spec.model.allow_dynamic_adapters:
                        raise TargetError(f"model {model!r} is not served here and model.allow_dynamic_adapters is off")
                    entry = self.dynamic.setdefault(ref, _Followed(ref))
            return self._current(entry, model)
        raise TargetError(f"The model '{model}' does not exist on this deployment. Available: "
                          + ", ".join(r["id"] for r in self.names()))

    def _current(self, entry: _Followed, model: str) -> Target:
        if entry.target is None:
            self._refresh_one(entry, raise_errors=True)
        tgt = entry.target
        return Target(model, tgt.adapter_id, tgt.adapter_path, tgt.version)

    # ------------------------------------------------------------------ following

    def refresh(self) -> list[tuple[str, int | None, int | None]]:
        """Re-resolve every followed reference; returns (ref, old version, new version) that moved."""
        moved = []
        for entry in list(self.followed().values()):
            old = entry.target.version if entry.target else None
            try:
                self._refresh_one(entry, raise_errors=False)
            except Exception as exc:  # registry down: keep serving what we have
                log.warning("registry poll of %s failed: %s", entry.ref, exc)
                continue
            new = entry.target.version if entry.target else None
            if new != old:
                moved.append((entry.ref, old, new))
        return moved

    def _refresh_one(self, entry: _Followed, raise_errors: bool) -> None:
        try:
            resolved = self._resolve(entry.ref)
        except PlatformError as exc:
            if raise_errors:
                raise TargetError(f"{entry.ref.removeprefix('models:/')}: {exc}", 404) from exc
            raise
        version = int(getattr(resolved, "version"))
        if entry.target is not None and entry.target.version == version:
            return
        if version in entry.refused:
            if raise_errors and entry.target is None:
                raise TargetError(entry.refused[version], 400, "adapter_incompatible")
            return
        path = str(getattr(resolved, "local_path"))
        problems = self._check(path, self.base_dir)
        if problems:
            why = (f"{entry.ref} version {version} does not fit base {self.base_name}: " + "; ".join(problems))
            entry.refused[version] = why
            log.error("refusing %s", why)
            if raise_errors and entry.target is None:
                raise TargetError(why, 400, "adapter_incompatible")
            return
        name = getattr(resolved, "name", None) or entry.ref.removeprefix("models:/").split("@")[0].split("/")[0]
        entry.target = Target(entry.ref, f"{name}/{version}", path, version)

    def served_versions(self) -> dict[str, int | None]:
        return {ref: (e.target.version if e.target else None) for ref, e in self.followed().items()}

    def refused(self) -> dict[str, dict[int, str]]:
        return {ref: dict(e.refused) for ref, e in self.followed().items() if e.refused}


def _check_fit(adapter_dir: str, base_dir: str) -> list[str]:
    """Compatibility problems of an adapter on the base (empty when it fits or can't be checked)."""
    try:
        from llmplatform.registry.compat import check_compatibility
    except ImportError:
        return []
    base = Path(base_dir)
    return check_compatibility(adapter_dir, str(base) if base.is_dir() else None)


def check_local_adapters(spec: ServeSpec, base_dir: str) -> list[str]:
    """Pre-flight for `deploy`: every listed local adapter that is missing or does not fit."""
    problems = []
    for a in spec.model.adapters:
        if a.source.startswith("models:/"):
            continue
        path = Path(a.source).expanduser()
        if not path.is_dir():
            problems.append(f"model.adapters[{a.name}].source: {path} is not a directory")
            continue
        problems += [f"model.adapters[{a.name}]: {p}" for p in _check_fit(str(path), base_dir)]
    return problems
