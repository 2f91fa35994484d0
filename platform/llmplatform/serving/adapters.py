"""Which model or adapter a request's `model` names, and following registry promotions.

A deployment serves one base and any number of LoRA adapters. Requests name the base, an adapter
listed in the spec (`BASE:ADAPTER` or just `ADAPTER`), a registered version (`NAME/VERSION`) or an
alias (`NAME@ALIAS`, e.g. `support-bot@production`); the deployment name itself means the spec's
`model.registry` adapter when one is set, else the base. Aliases are re-resolved every
`registry_poll_s`: when `platformctl models promote` moves one, new requests get the new version
(a new multiplexed adapter id, loaded lazily) while requests already running finish on the old one.
A version whose adapter does not fit the base is refused, and a moved alias that points at one
keeps serving the previous version.

The registry never holds up the request path: a name not yet loaded is resolved on the table's own
small executor (one lookup per name at a time, at most MAX_PENDING waiting), the request waits for
it no longer than `limits.registry_lookup_timeout_s` (and its own deadline), and then gets 503 with
Retry-After. A name the registry does not know is remembered only as a bounded, expiring miss
(negative cache): it is never listed, never polled, and named in messages only truncated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmplatform.errors import PlatformError
from llmplatform.specs import REGISTRY_URI, ServeSpec

log = logging.getLogger(__name__)
LOOKUP_WORKERS = 2  # registry lookups running at once per replica
MAX_PENDING = 16  # distinct names waiting for the registry; more get 503 at once
MAX_MISSES = 1024  # unknown or failed names remembered (oldest forgotten first)
OUTAGE_RETRY_S = 5  # Retry-After (s) when the registry is unreachable; such failures are remembered this long
MAX_NAME_CHARS = 256  # longer model names are never sent to the registry
SHOWN_CHARS = 64  # characters of a client's model name that error messages repeat
# MLflow error codes that mean "the registry answered: no such name", not "the registry is down"
CLIENT_ERROR_CODES = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE", "BAD_REQUEST"}


def shown(name: str) -> str:
    """A client-sent name as error messages repeat it: at most SHOWN_CHARS characters."""
    return name if len(name) <= SHOWN_CHARS else f"{name[:SHOWN_CHARS]}... ({len(name)} chars)"


@dataclass(frozen=True)
class Target:
    """What a request runs on. adapter_id None = the base model."""

    model: str  # the name the client used (echoed in responses)
    adapter_id: str | None = None  # multiplexed id: "NAME/VERSION" or "local:NAME"
    adapter_path: str | None = None
    version: int | None = None
    served_as: str | None = None  # the /v1/models id it is served under (the metrics label)
    split: object | None = None  # serving.canary.Split while the alias has a canary (choose() picks per request)


class TargetError(PlatformError):
    """A request names a model we can't serve. status 404 unknown, 400 incompatible, 503 registry down."""

    def __init__(self, message: str, status: int = 404, code: str = "model_not_found", retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass
class _Followed:
    """A registry reference the deployment serves, and the version it currently resolves to."""

    ref: str  # models:/NAME@ALIAS or models:/NAME/VERSION
    target: Target | None = None
    refused: dict[int, str] = field(default_factory=dict)  # version -> why it was refused
    dynamic: bool = False  # named by a request, not the spec: followed only once it resolved
    split: object | None = None  # serving.canary.Split: the alias's canary (candidate target + state)


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


def default_canary_reader(tracking_uri: str | None) -> Callable[[str, str], object]:
    """`(name, alias) -> CanaryState | None` through llmplatform.registry.canary."""
    def read(name: str, alias: str):
        from llmplatform.registry.canary import state_of

        return state_of(tracking_uri, name, alias)
    return read


def default_base_resolver(name: str) -> str:
    from llmplatform.basemodels import locate

    return locate(name)


def locate_base(name: str) -> str:
    """Where the resolved base model's weights are (a directory or an HF id) on this node."""
    return default_base_resolver(str(name))


class AdapterTable:
    """Maps request model names to Targets; follows aliases. Thread-safe; all I/O is injected."""

    def __init__(self, spec: ServeSpec, base_name: str, base_dir: str, resolver: Callable[[str], object] | None = None,
                 check: Callable[[str, str], list[str]] | None = None, miss_ttl_s: float | None = None,
                 canary_reader: Callable[[str, str], object] | None = None):
        self.spec = spec
        # How long a registry miss is remembered: the resolved plan's registry_poll_s (the ingress
        # passes it; the operator's LLMOP_REGISTRY_POLL_S can override the spec's).
        self.miss_ttl_s = spec.registry_poll_s if miss_ttl_s is None else miss_ttl_s
        self.base_name = base_name
        self.base_dir = base_dir
        self._resolve = resolver or default_resolver(spec.tracking_uri)
        self._check = check or _check_fit
        # An injected resolver without a reader (tests, fakes) means no canaries: no hidden MLflow calls.
        self._read_canary = canary_reader or (default_canary_reader(spec.tracking_uri) if resolver is None
                                              else (lambda name, alias: None))
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
        self._pool = ThreadPoolExecutor(LOOKUP_WORKERS, thread_name_prefix="registry-lookup")
        self._pending: dict[str, Future] = {}  # ref -> the one lookup running for it
        self._misses: OrderedDict[str, tuple[float, TargetError]] = OrderedDict()  # ref -> (expires, error)
        self._outage: tuple[float, str] | None = None  # (since, why) while the registry fails

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

    def lookup(self, model: str, timeout: float | None = None) -> Target:
        """The Target for a request's `model`, waiting at most `timeout` s for the registry;
        raises TargetError (404 unknown, 400 incompatible, 503 registry unavailable)."""
        return self.settle(self.lookup_future(model), model, timeout)

    def lookup_future(self, model: str) -> Future:
        """A future of the Target (or of the followed entry); already done unless the registry must be asked."""
        done: Future = Future()
        try:
            entry = self._entry(model)
        except TargetError as exc:
            done.set_exception(exc)
            return done
        if isinstance(entry, Target) or entry.target is not None:
            done.set_result(entry)
            return done
        return self._first_lookup(entry)

    def settle(self, fut: Future, model: str, timeout: float | None, waited: float | None = None) -> Target:
        """The Target of a `lookup_future`, or 503 when the registry hasn't answered within `timeout` s
        (`waited`: how long the caller already waited elsewhere, for the message)."""
        try:
            entry = fut.result(timeout)
        except FutureTimeout:
            waited = timeout if waited is None else waited
            self._note_outage(f"no answer within {waited:g} s")
            raise TargetError(f"The model registry did not answer within {waited:g} s for '{shown(model)}'; "
                              f"models already loaded keep serving. Retry after {OUTAGE_RETRY_S} s.",
                              503, "registry_unavailable", OUTAGE_RETRY_S) from None
        if isinstance(entry, Target):
            return Target(model, entry.adapter_id, entry.adapter_path, entry.version, entry.served_as)
        tgt = entry.target
        return Target(model, tgt.adapter_id, tgt.adapter_path, tgt.version, self._served_as(entry), entry.split)

    def _entry(self, model: str) -> Target | _Followed:
        """What `model` names, without I/O: a Target, a followed entry (maybe not resolved yet), or TargetError."""
        name = model.strip()
        if name == self.base_name or (name == self.spec.name and not self.default):
            return Target(model, served_as=name)
        if name == self.spec.name and self.default:
            return self.default
        short = name.split(":", 1)[1] if name.startswith(self.base_name + ":") else name
        if short in self.static:
            entry = self.static[short]
            return entry if isinstance(entry, _Followed) else Target(model, entry.adapter_id, entry.adapter_path,
                                                                     served_as=f"{self.base_name}:{short}")
        ref = registry_ref(short) if len(short) <= MAX_NAME_CHARS else None
        if not ref:
            raise TargetError(f"The model '{shown(model)}' does not exist on this deployment. Available: "
                              + ", ".join(r["id"] for r in self.names()[:20])
                              + ". Use BASE:ADAPTER, NAME@ALIAS or NAME/VERSION for registered adapters.")
        with self._lock:
            entry = self.followed().get(ref)
            if entry is not None:
                return entry
            if not self.spec.model.allow_dynamic_adapters:
                raise TargetError(f"model '{shown(model)}' is not served here and model.allow_dynamic_adapters is off")
            miss = self._misses.get(ref)
            if miss and miss[0] > time.monotonic():
                raise miss[1]
            self._misses.pop(ref, None)
        return _Followed(ref, dynamic=True)

    def _served_as(self, entry: _Followed) -> str:
        if entry is self.default:
            return self.spec.name
        for name, static in self.static.items():
            if static is entry:
                return f"{self.base_name}:{name}"
        return entry.ref.removeprefix("models:/")

    def _first_lookup(self, entry: _Followed) -> Future:
        """The one lookup of `entry.ref` in flight, on the table's own executor (started if needed)."""
        with self._lock:
            fut = self._pending.get(entry.ref)
            if fut is not None:
                return fut
            if len(self._pending) >= MAX_PENDING:
                failed: Future = Future()
                failed.set_exception(TargetError(f"{len(self._pending)} registry lookups are already waiting; "
                                                 f"retry after {OUTAGE_RETRY_S} s", 503, "registry_unavailable", OUTAGE_RETRY_S))
                return failed
            fut = self._pending[entry.ref] = self._pool.submit(self._resolve_first, entry)
            return fut

    def _resolve_first(self, entry: _Followed) -> _Followed:
        """Runs on the lookup executor. A dynamic name is followed only once it resolved; a failure is a miss."""
        try:
            self._refresh_one(entry, raise_errors=True)
        except TargetError as exc:  # the registry answered: unknown name or a misfit version
            self._registry_answered()
            self._remember_miss(entry.ref, exc, self.miss_ttl_s)
            raise
        except Exception as exc:  # unreachable or failing registry
            self._note_outage(f"{type(exc).__name__}: {exc}")
            err = TargetError(f"The model registry failed resolving '{shown(entry.ref.removeprefix('models:/'))}' "
                              f"({type(exc).__name__}); models already loaded keep serving. Retry after {OUTAGE_RETRY_S} s.",
                              503, "registry_unavailable", OUTAGE_RETRY_S)
            self._remember_miss(entry.ref, err, OUTAGE_RETRY_S)
            raise err from exc
        finally:
            with self._lock:
                self._pending.pop(entry.ref, None)
        self._registry_answered()
        if entry.dynamic:
            with self._lock:
                entry = self.dynamic.setdefault(entry.ref, entry)
        return entry

    def _remember_miss(self, ref: str, err: TargetError, ttl_s: float) -> None:
        if not ref.startswith("models:/") or ref in self.followed():
            return  # names from the spec are retried by the poll, not cached as misses
        with self._lock:
            self._misses[ref] = (time.monotonic() + ttl_s, err)
            self._misses.move_to_end(ref)
            while len(self._misses) > MAX_MISSES:
                self._misses.popitem(last=False)

    # ------------------------------------------------------------------ registry health

    def _note_outage(self, why: str) -> None:
        with self._lock:
            self._outage = (self._outage or (time.time(), ""))[0], why[:300]

    def _registry_answered(self) -> None:
        with self._lock:
            self._outage = None

    def registry_health(self) -> dict | None:
        """None while the registry answers; else {"since": unix time, "error": why} of the current outage."""
        outage = self._outage
        return {"since": round(outage[0], 1), "error": outage[1]} if outage else None

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
                if not isinstance(exc, PlatformError) and not _is_client_error(exc):
                    self._note_outage(f"{type(exc).__name__}: {exc}")
                continue
            self._registry_answered()
            new = entry.target.version if entry.target else None
            if new != old:
                moved.append((entry.ref, old, new))
        return moved

    def _refresh_one(self, entry: _Followed, raise_errors: bool) -> None:
        self._refresh_holder(entry, raise_errors)
        try:
            self._refresh_canary(entry)
        except Exception as exc:  # the holder keeps serving; the split stays as it was until the next poll
            log.warning("registry poll of the canary of %s failed: %s: %s", entry.ref, type(exc).__name__, str(exc)[:300])

    def _refresh_canary(self, entry: _Followed) -> None:
        """The alias's canary, if any, as `entry.split`: only while its baseline is the holder we serve
        (completing moves the alias first, so a stale split never outlives it) and its version fits."""
        from llmplatform.registry.refs import parse_ref
        from llmplatform.serving.canary import Split

        parsed = parse_ref(entry.ref)
        state = self._read_canary(parsed.name, parsed.alias) if parsed.alias and entry.target else None
        if state is None or state.baseline != entry.target.version or state.version in entry.refused:
            entry.split = None
            return
        if entry.split is not None and entry.split.target.version == state.version:
            entry.split = Split(entry.split.target, state)  # a new weight or guard; same candidate
            return
        resolved = self._resolve(f"models:/{parsed.name}/{state.version}")
        path = str(getattr(resolved, "local_path"))
        problems = self._check(path, self.base_dir)
        if problems:
            entry.refused[state.version] = (f"canary {parsed.name} version {state.version} does not fit base "
                                            f"{self.base_name}: " + "; ".join(problems))
            log.error("refusing %s", entry.refused[state.version])
            entry.split = None
            return
        entry.split = Split(Target(entry.ref, f"{parsed.name}/{state.version}", path, state.version), state)

    def canaries(self) -> dict[str, object]:
        """ref -> Split of every followed alias with a canary right now."""
        return {ref: e.split for ref, e in self.followed().items() if e.split is not None}

    def drop_canary(self, ref: str) -> None:
        """Stop splitting `ref` at once (the guard aborted it; the registry already says so)."""
        entry = self.followed().get(ref)
        if entry is not None:
            entry.split = None

    def _refresh_holder(self, entry: _Followed, raise_errors: bool) -> None:
        try:
            resolved = self._resolve(entry.ref)
        except Exception as exc:
            if raise_errors and (isinstance(exc, PlatformError) or _is_client_error(exc)):
                raise TargetError(f"{shown(entry.ref.removeprefix('models:/'))}: {str(exc)[:300]}", 404) from exc
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


def _is_client_error(exc: Exception) -> bool:
    """The registry refused the name itself (unknown, malformed), as opposed to being unreachable."""
    return getattr(exc, "error_code", None) in CLIENT_ERROR_CODES


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
