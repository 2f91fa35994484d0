"""The transformers engine's admission: `min_admit` (what evaluation jobs use) batches refills of the
running batch into fewer prefill passes without changing any answer."""

from __future__ import annotations

import asyncio

from llmplatform.serving.engines import GenerationRequest
from llmplatform.serving.engines.hf import HFEngine


def _run_all(min_admit: int) -> tuple[list[list[int]], dict]:
    from llmplatform import paths
    from llmplatform.tiny import ensure_tiny_model

    engine = HFEngine(str(ensure_tiny_model("random", paths.model_cache())), max_batch_size=4, max_model_len=256,
                      device="cpu", min_admit=min_admit)
    try:
        async def one(i: int) -> list[int]:
            req = GenerationRequest(prompt_ids=[1, 5 + i, 9 + 2 * i][: 2 + i % 2], max_tokens=1 + (i * 5) % 9,
                                    temperature=0.0, ignore_eos=True)
            return [e async for e in engine.generate(req)][-1]["token_ids"]

        async def every() -> list[list[int]]:
            return list(await asyncio.gather(*(one(i) for i in range(12))))

        return asyncio.run(every()), engine.info()
    finally:
        engine.shutdown()


def test_refilling_half_a_batch_at_a_time_gives_the_same_answers_in_fewer_prefill_passes():
    at_once, info_at_once = _run_all(min_admit=1)
    batched, info_batched = _run_all(min_admit=2)
    assert batched == at_once  # greedy, same tokens for every request
    assert [len(t) for t in at_once] == [1 + (i * 5) % 9 for i in range(12)]
    assert info_batched["prefill_passes"] < info_at_once["prefill_passes"]
