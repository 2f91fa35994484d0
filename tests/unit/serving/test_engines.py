"""Engine choice and vLLM engine arguments (pure; vLLM itself runs in the vllm tier)."""

from __future__ import annotations

import importlib.util

from llmplatform.serving.engines import pick_engine, vllm_usable
from llmplatform.serving.engines.vllm import engine_args


def test_auto_picks_vllm_only_when_importable():
    ok, why = vllm_usable()
    assert ok == (importlib.util.find_spec("vllm") is not None)
    assert pick_engine("auto") == ("vllm" if ok else "hf")
    assert not ok or why
    assert pick_engine("hf") == "hf" and pick_engine("vllm") == "vllm"


def test_vllm_tp_uses_the_ray_executor_and_lora():
    args = engine_args("/m", dtype="bfloat16", max_model_len=4096, tensor_parallel=2, max_batch_size=64, max_loaded_adapters=8)
    assert args["tensor_parallel_size"] == 2 and args["distributed_executor_backend"] == "ray"
    assert args["enable_lora"] and args["max_loras"] == 8 and args["max_num_seqs"] == 64
    single = engine_args("/m", dtype="auto", max_model_len=512, tensor_parallel=1, max_batch_size=8, max_loaded_adapters=2)
    assert "distributed_executor_backend" not in single and single["dtype"] == "auto"


def test_base_only_deployments_run_vllm_without_lora_layers():
    from llmplatform.serving.replica import serves_adapters
    from llmplatform.specs import parse_spec

    def spec(**model):
        return parse_spec("serve", {"name": "s", "engine": "vllm", "model": {"base": "llama2-7b", **model}})

    assert not serves_adapters(spec(allow_dynamic_adapters=False))
    assert serves_adapters(spec())  # dynamic adapters are on by default
    assert serves_adapters(spec(allow_dynamic_adapters=False, adapters=[{"name": "a", "source": "/tmp/a"}]))
    assert serves_adapters(spec(base=None, registry="models:/bot@production", allow_dynamic_adapters=False))
    args = engine_args("/m", dtype="bfloat16", max_model_len=512, tensor_parallel=1, max_batch_size=8, max_loaded_adapters=2,
                       enable_lora=False)
    assert args["enable_lora"] is False and "max_loras" not in args and "max_lora_rank" not in args
