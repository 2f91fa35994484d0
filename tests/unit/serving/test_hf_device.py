"""The transformers engine's device and dtype: the replica's GPU when it has one, bf16 there, one GPU per replica.

The CUDA path itself runs in `bench/device_check.sh` on a GPU machine (bench/README.md); here the choices
are checked as pure functions and a real engine runs on the CPU with everything on its chosen device.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from llmplatform.serving.engines import EngineError, GenerationRequest
from llmplatform.serving.engines.hf import HFEngine, check_tensor_parallel, pick_device, pick_dtype


def test_a_replica_with_a_gpu_runs_on_it_and_one_without_on_the_cpu():
    assert pick_device("auto", cuda_available=True) == torch.device("cuda", 0)
    assert pick_device("auto", cuda_available=False) == torch.device("cpu")
    with pytest.raises(EngineError, match="sees no CUDA GPU.*gpus_per_shard"):
        pick_device("cuda", cuda_available=False)


def test_auto_dtype_is_bf16_on_gpus_that_have_it_fp16_on_older_ones_fp32_on_cpu():
    gpu = torch.device("cuda", 0)
    assert pick_dtype("auto", gpu, bf16_supported=True) == torch.bfloat16
    assert pick_dtype("auto", gpu, bf16_supported=False) == torch.float16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(EngineError, match="'nf4'.*engine: vllm"):
        pick_dtype("nf4", gpu)


def test_tensor_parallel_over_gpus_is_refused_naming_vllm_and_a_cpu_reservation_is_not():
    with pytest.raises(EngineError, match="tensor_parallel=2.*one GPU.*vllm"):
        check_tensor_parallel(2, torch.device("cuda", 0))
    check_tensor_parallel(2, torch.device("cpu"))  # CPU replicas: the placement group is a reservation only
    check_tensor_parallel(1, torch.device("cuda", 0))


def test_the_engine_puts_weights_on_its_device_and_reports_it():
    from llmplatform import paths
    from llmplatform.tiny import ensure_tiny_model

    engine = HFEngine(str(ensure_tiny_model("random", paths.model_cache())), max_batch_size=4, max_model_len=256, device="cpu")
    try:
        assert engine.info()["device"] == "cpu" and engine.info()["dtype"] == "float32"
        assert {p.device for p in engine.model.parameters()} == {engine.device}

        async def run() -> list[dict]:
            req = GenerationRequest(prompt_ids=[1, 5, 9, 13], max_tokens=6, temperature=0.0, ignore_eos=True)
            return [event async for event in engine.generate(req)]

        events = asyncio.run(run())
        assert events[-1]["completion_tokens"] == 6 and events[-1]["finish_reason"] == "length"
    finally:
        engine.shutdown()


def test_a_request_that_ends_at_its_first_token_beside_a_running_one_fails_neither():
    """EOS as the very first token (here forced with logit_bias) leaves a row with no output; the next decode
    step must not see it (it raised IndexError and failed every request of the replica)."""
    from llmplatform import paths
    from llmplatform.tiny import ensure_tiny_model

    engine = HFEngine(str(ensure_tiny_model("random", paths.model_cache())), max_batch_size=4, max_model_len=256, device="cpu")
    try:
        async def run(req: GenerationRequest) -> dict:
            return [event async for event in engine.generate(req)][-1]

        async def both() -> list[dict]:
            long = GenerationRequest(prompt_ids=[1, 5, 9], max_tokens=12, temperature=0.0, ignore_eos=True)
            eos_first = GenerationRequest(prompt_ids=[1, 7], max_tokens=12, temperature=0.0, logit_bias={engine.eos_id: 100.0})
            return await asyncio.gather(run(long), run(eos_first), run(GenerationRequest(prompt_ids=[1, 8], max_tokens=1, temperature=0.0)))

        long, eos_first, one = asyncio.run(both())
        assert (long["finish_reason"], long["completion_tokens"]) == ("length", 12)
        assert (eos_first["finish_reason"], eos_first["completion_tokens"]) == ("stop", 0)
        assert (one["finish_reason"], one["completion_tokens"]) == ("length", 1)
    finally:
        engine.shutdown()
