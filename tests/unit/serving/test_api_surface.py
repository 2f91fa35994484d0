"""Request validation, error bodies, API-key hashing and model-name routing (no Ray)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmplatform.serving import errors as E
from llmplatform.serving.adapters import AdapterTable, TargetError, registry_ref
from llmplatform.serving.ingress import hash_key, parse_keys
from llmplatform.serving.openai_schema import ChatCompletionRequest, CompletionRequest
from llmplatform.specs import parse_spec


def test_bad_parameters_name_the_field():
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3})
    api = E.from_validation(err.value)
    assert api.status == 400 and "temperature" in api.message and api.body()["error"]["param"] == "temperature"


def test_prompts_as_text_or_token_ids():
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 5, 9]}).prompt_token_ids() == [1, 5, 9]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 5]]}).prompt_token_ids() == [1, 5]
    assert CompletionRequest.model_validate({"model": "m", "prompt": "hi"}).prompt_text() == "hi"
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "END"}).stop_list() == ["END"]


def test_context_error_carries_both_numbers_and_429_retry_after():
    err = E.context_too_long(300, 400, 512)
    assert "512" in err.message and "300 in the messages" in err.message and "400 in the completion" in err.message
    busy = E.overloaded(2, 40, 40)
    assert busy.status == 429 and busy.headers["Retry-After"] == "2"


def test_keys_are_hashed_plain_or_prefixed():
    hashes = parse_keys(f"# comment\nplain-key\nsha256:{hash_key('other')}\n")
    assert hashes == {hash_key("plain-key"), hash_key("other")}
    assert "plain-key" not in "".join(hashes)
    assert parse_keys("a, b", ",") == {hash_key("a"), hash_key("b")}


class Resolved:
    def __init__(self, name, version, path):
        self.name, self.version, self.local_path = name, version, path


def table(registry_versions: dict, misfit: set = frozenset(), **model):
    spec = parse_spec("serve", {"name": "dep", "model": {"base": "llama2-tiny", **model}})

    def resolve(ref):
        name = ref.removeprefix("models:/").split("@")[0].split("/")[0]
        version = registry_versions[ref.removeprefix("models:/")]
        return Resolved(name, version, f"/adapters/{name}/v{version}")

    return AdapterTable(spec, "llama2-tiny", "/base", resolver=resolve,
                        check=lambda path, base: [f"{path} misfit"] if path in misfit else [])


def test_names_route_to_base_listed_and_registry_adapters():
    versions = {"bot@production": 3, "bot/2": 2}
    t = table(versions, adapters=[{"name": "a", "source": "/tmp/a"}], registry="models:/bot@production")
    assert t.lookup("llama2-tiny").adapter_id is None
    assert t.lookup("llama2-tiny:a").adapter_path == "/tmp/a" and t.lookup("a").adapter_id == "local:a"
    assert t.lookup("dep").adapter_id == "bot/3"  # the deployment name serves model.registry
    assert t.lookup("bot/2").adapter_id == "bot/2"
    with pytest.raises(TargetError) as err:
        t.lookup("nope")
    assert err.value.status == 404 and "llama2-tiny:a" in str(err.value)


def test_moved_alias_switches_and_a_misfit_version_is_refused():
    versions = {"bot@production": 1}
    t = table(versions, {"/adapters/bot/v2"}, registry="models:/bot@production")
    assert t.lookup("bot@production").version == 1
    versions["bot@production"] = 2  # promoted to a version that doesn't fit: keep serving v1
    assert t.refresh() == []
    assert t.lookup("bot@production").version == 1 and 2 in t.refused()["models:/bot@production"]
    versions["bot@production"] = 3
    assert t.refresh() == [("models:/bot@production", 1, 3)]
    assert t.lookup("bot@production").adapter_id == "bot/3"


def test_registry_ref_forms():
    assert registry_ref("bot@prod") == "models:/bot@prod" and registry_ref("bot/4") == "models:/bot/4"
    assert registry_ref("llama2-tiny:a") is None
