"""The ingress takes its API-key file from the resolved plan and follows it when it changes.

On Kubernetes the operator mounts the API-key Secret and resolves `api_keys_file` to the mounted
path; the kubelet updates a Secret volume by swapping a `..data` symlink. The ingress class here is
the copy a replica unpickles; no Ray cluster is needed.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import cloudpickle
import pytest
from starlette.requests import Request

from llmplatform.basemodels import tokenizer_location
from llmplatform.resolve import Facts, resolve
from llmplatform.serving import errors as E
from llmplatform.serving.ingress import OpenAIIngress, hash_key
from llmplatform.specs import parse_spec


def write_secret_volume(mount: Path, text: str, version: int) -> None:
    """What the kubelet does: a new timestamped dir, `..data` swapped to it, `keys` -> `..data/keys`."""
    new = mount / f"..2026_12_04_v{version}"
    new.mkdir()
    (new / "keys").write_text(text)
    tmp = mount / "..data_tmp"
    tmp.symlink_to(new.name)
    os.replace(tmp, mount / "..data")
    if not (mount / "keys").is_symlink():
        (mount / "keys").symlink_to("..data/keys")


def bearer(key: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/v1/models", "headers": [(b"authorization", f"Bearer {key}".encode())]})


def accepts(ingress, key: str) -> bool:
    try:
        ingress._auth(bearer(key))
        return True
    except E.ApiError as err:
        assert err.status == 401
        return False


@pytest.fixture()
def ingress_for(monkeypatch):
    monkeypatch.delenv("PLATFORM_API_KEYS", raising=False)
    made = []

    def make(auth: dict, facts: Facts):
        spec = parse_spec("serve", {"name": "chat", "model": {"base": "llama2-tiny"}, "auth": auth})
        plan = resolve(spec, facts).require()
        wrapper = cloudpickle.loads(OpenAIIngress._replica_config.serialized_deployment_def)  # the replica's copy
        cls = wrapper.__mro__[1]  # ours, under Serve's ASGI wrapper (whose async __init__ needs the replica's loop)
        assert cls.__init__.__module__ == "llmplatform.serving.ingress" and not inspect.iscoroutinefunction(cls.__init__)
        ingress = cls(plan.to_dict(), object(), tokenizer_location("llama2-tiny"))
        made.append(ingress)
        return ingress, plan

    yield make
    for ingress in made:
        ingress._stop.set()  # the registry-poll thread


def test_the_ingress_reads_the_mounted_secret_the_plan_names_and_follows_a_rotation(tmp_path, ingress_for) -> None:
    mount = tmp_path / "api-keys"
    mount.mkdir()
    write_secret_volume(mount, f"# team a\nold-key\nsha256:{hash_key('hashed-key')}\n", 1)
    ingress, plan = ingress_for({"enabled": True, "api_keys_file": "/laptop/keys.txt"}, Facts(target="k8s", api_keys_file=str(mount / "keys")))
    assert plan["api_keys_file"] == str(mount / "keys")  # the target's file, not the spec's
    assert accepts(ingress, "old-key") and accepts(ingress, "hashed-key") and not accepts(ingress, "nope")

    write_secret_volume(mount, "new-key\n", 2)  # `kubectl create secret ... --dry-run=client -o yaml | kubectl apply -f -`
    assert accepts(ingress, "new-key") and not accepts(ingress, "old-key")


def test_a_missing_keys_file_refuses_every_key_and_env_keys_still_work(tmp_path, ingress_for, monkeypatch) -> None:
    monkeypatch.setenv("PLATFORM_API_KEYS", "env-key")
    ingress, plan = ingress_for({"enabled": True}, Facts(target="k8s", api_keys_file=str(tmp_path / "absent" / "keys")))
    assert accepts(ingress, "env-key") and not accepts(ingress, "other")


def test_without_a_target_file_the_specs_file_is_read(tmp_path, ingress_for) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("local-key\n")
    ingress, plan = ingress_for({"enabled": True, "api_keys_file": str(keys)}, Facts())
    assert plan["api_keys_file"] == str(keys) and plan.source("api_keys_file") == "spec"
    assert accepts(ingress, "local-key") and not accepts(ingress, "other")


def test_a_key_resolves_to_its_named_identity_with_limits_from_the_file_or_the_deployers_env(tmp_path, ingress_for) -> None:
    from llmplatform.serving.keys import KeyIdentity

    keys = tmp_path / "keys.txt"
    keys.write_text(f"sha256:{hash_key('team-a-key')} name=team-a rpm=2\nold-style-key\n")
    ingress, _ = ingress_for({"enabled": True, "api_keys_file": str(keys)}, Facts())
    assert ingress._auth(bearer("team-a-key")) == KeyIdentity("team-a", rpm=2)
    assert ingress._auth(bearer("old-style-key")).name == f"key-{hash_key('old-style-key')[:8]}"


class LocalLimiter:
    """The limiter deployment's own class, called in-process (`.remote` as Serve's handle awaits it)."""

    def __init__(self, slow_s: float = 0.0):
        from llmplatform.serving.limits import RateLimiter

        inner = RateLimiter.func_or_class()

        class Method:
            def __init__(self, fn):
                self.fn = fn

            async def remote(self, *args):
                import asyncio

                await asyncio.sleep(slow_s)
                return self.fn(*args)

        self.admit, self.charge = Method(inner.admit), Method(inner.charge)


def test_over_its_limit_a_key_gets_429_with_retry_after_and_a_silent_limiter_fails_open(monkeypatch) -> None:
    import asyncio
    from types import SimpleNamespace

    from llmplatform.serving.accounting import Accounting
    from llmplatform.serving.keys import KeyIdentity

    class Plan(dict):  # what Accounting reads of a resolved plan: .spec and ["api_keys_file"]
        spec = SimpleNamespace(auth=SimpleNamespace(enabled=True, api_keys_env=None), name="chat")

    monkeypatch.setenv("PLATFORM_USAGE_DB", "off")
    acct = Accounting(Plan(api_keys_file=None), [], LocalLimiter())
    slow = Accounting(Plan(api_keys_file=None), [], LocalLimiter(slow_s=30))
    team = KeyIdentity("team-a", rpm=2)

    async def run():
        await acct.admit(team)
        await acct.admit(team)
        with pytest.raises(E.ApiError) as err:
            await acct.admit(team)
        await acct.admit(KeyIdentity("team-b", rpm=2))  # another key is unaffected
        await slow.admit(team)  # no answer in LIMITER_TIMEOUT_S: admitted
        return err.value

    err = asyncio.run(run())
    assert err.status == 429 and err.code == "rate_limit_exceeded" and err.headers == {"Retry-After": "30"}
    assert "team-a" in err.message
