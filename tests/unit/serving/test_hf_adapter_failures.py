"""An adapter the transformers engine refuses leaves nothing behind: the base model and every other
adapter keep serving, and later loads work (a refused canary once broke every later adapter load
of its replica with a KeyError on the refused adapter's name)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from llmplatform.serving.engines import EngineError, GenerationRequest


def make_adapter(base_dir: str, out, seed: int, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    if config:
        cfg = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return str(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llmplatform.basemodels import locate
    from llmplatform.serving.engines.hf import HFEngine

    base = locate("llama2-tiny-random")
    root = tmp_path_factory.mktemp("adapters")
    paths = {"good": make_adapter(base, root / "good", 1), "other": make_adapter(base, root / "other", 2),
             "faulty": make_adapter(base, root / "faulty", 3, lora_dropout=1.5)}  # peft refuses it while building its layers
    engine = HFEngine(base, max_model_len=128)
    yield engine, paths
    engine.shutdown()


def answer(engine, adapter: str | None = None, path: str | None = None) -> str:
    async def main():
        req = GenerationRequest(prompt_ids=[1, 415, 302, 77], max_tokens=8, temperature=0.0, ignore_eos=True,
                                adapter_id=adapter, adapter_path=path)
        return "".join([e.get("text", "") async for e in engine.generate(req)])

    return asyncio.run(asyncio.wait_for(main(), 60))


def wait_reaped(engine, timeout: float = 10.0) -> None:
    """The decode thread deletes unloaded adapters once idle (within about half a second)."""
    deadline = time.time() + timeout
    while engine._doomed and time.time() < deadline:
        time.sleep(0.05)
    assert not engine._doomed


def refuse(engine, adapter_id: str, path: str) -> None:
    with pytest.raises(EngineError, match="cannot be loaded.*dropout probability"):
        engine.load_adapter(adapter_id, path)


def test_a_refused_first_adapter_leaves_the_base_model_as_it_was(setup):
    engine, paths = setup
    base_text = answer(engine)
    refuse(engine, "faulty/1", paths["faulty"])  # the first adapter: peft wraps the base model's layers in place
    assert answer(engine) == base_text
    assert answer(engine, "good/1", paths["good"]) != base_text


def test_after_a_refused_adapter_the_others_unload_and_load_again(setup):
    engine, paths = setup
    good = answer(engine, "good/1", paths["good"])
    refuse(engine, "faulty/1", paths["faulty"])
    engine.unload_adapter("good/1")
    wait_reaped(engine)  # peft made the refused adapter's name the active one here
    assert answer(engine, "good/1", paths["good"]) == good
    other = answer(engine, "other/1", paths["other"])
    assert other not in {good, answer(engine)}
    assert engine.info()["adapters_loaded"] == ["good/1", "other/1"]


def test_a_prefill_that_fails_answers_its_request_with_an_error_and_the_engine_serves_on(setup):
    engine, _ = setup
    base_text = answer(engine)

    async def bad_token():  # an id past the vocabulary: the embedding lookup raises inside the prefill
        req = GenerationRequest(prompt_ids=[1, 10**6], max_tokens=4, temperature=0.0)
        return [e async for e in engine.generate(req)]

    with pytest.raises(EngineError, match="engine step failed: IndexError"):
        asyncio.run(asyncio.wait_for(bad_token(), 30))  # it waited forever: the admitted row was in no queue
    assert answer(engine) == base_text
