"""Registry lookups on the request path (no Ray, no MLflow): bounded waits, negative caching,
unknown names forgotten, registry health, truncated names in messages, bounded metrics labels."""

from __future__ import annotations

import threading
import time

import pytest

from llmplatform.errors import RegistryError
from llmplatform.serving import adapters as A
from llmplatform.serving.adapters import AdapterTable, TargetError
from llmplatform.serving.metrics import ServeMetrics
from llmplatform.specs import parse_spec


class Resolved:
    def __init__(self, name, version):
        self.name, self.version, self.local_path = name, version, f"/adapters/{name}/v{version}"


class Registry:
    """A fake registry: knows `bot@production`; `hang` makes every call block until released."""

    def __init__(self):
        self.calls: list[str] = []
        self.hang = threading.Event()
        self.release = threading.Event()

    def __call__(self, ref: str):
        self.calls.append(ref)
        if self.hang.is_set():
            self.release.wait(10)
            raise ConnectionError("registry unreachable")
        if ref == "models:/bot@production":
            return Resolved("bot", 3)
        raise RegistryError(f"no registered model named {ref!r}")


@pytest.fixture
def registry():
    reg = Registry()
    yield reg
    reg.release.set()


def table(registry, **spec) -> AdapterTable:
    s = parse_spec("serve", {"name": "dep", "model": {"base": "llama2-tiny"}, "registry_poll_s": 60, **spec})
    return AdapterTable(s, "llama2-tiny", "/base", resolver=registry, check=lambda path, base: [])


def test_unknown_name_is_404_cached_and_never_listed_or_polled(registry):
    t = table(registry)
    for _ in range(3):
        with pytest.raises(TargetError) as err:
            t.lookup("ghost@production", timeout=5)
        assert err.value.status == 404
    assert registry.calls == ["models:/ghost@production"]  # negative cache: asked once
    assert "ghost" not in str(t.names()) and not t.followed()
    t.refresh()
    assert registry.calls == ["models:/ghost@production"]  # the poll never asks for it
    assert t.lookup("bot@production", timeout=5).adapter_id == "bot/3"
    assert "bot@production" in {r["id"] for r in t.names()}  # a name that resolved is followed


def test_hung_registry_answers_503_within_the_timeout_and_loaded_names_keep_serving(registry):
    t = table(registry, model={"base": "llama2-tiny", "adapters": [{"name": "a", "source": "/tmp/a"}]})
    t.lookup("bot@production", timeout=5)
    registry.hang.set()
    t0 = time.monotonic()
    for i in range(6):  # more distinct names than lookup workers
        with pytest.raises(TargetError) as err:
            t.lookup(f"ghost{i}@production", timeout=0.2)
        assert err.value.status == 503 and err.value.retry_after_s and err.value.code == "registry_unavailable"
    assert time.monotonic() - t0 < 3
    assert t.lookup("bot@production", timeout=0.2).adapter_id == "bot/3"  # loaded: no registry call
    assert t.lookup("a").adapter_id == "local:a" and t.lookup("llama2-tiny").adapter_id is None
    assert t.registry_health() is not None
    assert not any("ghost" in r["id"] for r in t.names())
    registry.release.set()  # the hung lookups fail: still not listed; a later answer clears the outage
    registry.hang.clear()
    deadline = time.monotonic() + 5
    while t._pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any("ghost" in r["id"] for r in t.names())
    t.refresh()
    assert t.registry_health() is None


def test_pending_lookups_are_bounded(registry, monkeypatch):
    monkeypatch.setattr(A, "MAX_PENDING", 3)
    t = table(registry)
    registry.hang.set()
    for i in range(3):
        t.lookup_future(f"ghost{i}@production")
    t0 = time.monotonic()
    with pytest.raises(TargetError) as err:
        t.lookup("one-more@production", timeout=5)
    assert err.value.status == 503 and time.monotonic() - t0 < 1  # refused at once, not queued


def test_messages_truncate_client_names(registry):
    t = table(registry)
    for name in ("x" * 100_000, "y" * 300 + "@prod", "z" * 200 + "@prod"):
        with pytest.raises(TargetError) as err:
            t.lookup(name, timeout=5)
        assert err.value.status == 404 and len(str(err.value)) < 1000
    assert all(len(ref) < 300 for ref in registry.calls)  # over-long names never reach the registry


def test_metrics_label_only_served_names(registry):
    t = table(registry, model={"base": "llama2-tiny", "adapters": [{"name": "a", "source": "/tmp/a"}]})
    assert ServeMetrics.label(t.lookup(" llama2-tiny ").served_as) == "llama2-tiny"
    assert ServeMetrics.label(t.lookup("a").served_as) == "llama2-tiny:a"
    assert ServeMetrics.label(t.lookup("bot@production", timeout=5).served_as) == "bot@production"
    assert ServeMetrics.label(None) == "unknown"


def test_a_miss_is_remembered_for_the_plans_poll_interval_not_the_specs(registry):
    """The operator's LLMOP_REGISTRY_POLL_S overrides the spec's registry_poll_s in the plan; the
    ingress hands the plan's value to the table, so a name registered meanwhile is found on time."""
    s = parse_spec("serve", {"name": "dep", "model": {"base": "llama2-tiny"}, "registry_poll_s": 3600})
    t = AdapterTable(s, "llama2-tiny", "/base", resolver=registry, check=lambda path, base: [], miss_ttl_s=0.2)
    for _ in range(2):
        with pytest.raises(TargetError):
            t.lookup("ghost@production", timeout=5)
    assert registry.calls == ["models:/ghost@production"]
    time.sleep(0.3)
    with pytest.raises(TargetError):
        t.lookup("ghost@production", timeout=5)
    assert registry.calls == ["models:/ghost@production"] * 2  # asked again after 0.2 s, not after an hour
