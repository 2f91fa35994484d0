"""OpenAI-compatible request and response bodies (pydantic v2).

Requests accept the fields the `openai` SDK sends (unknown extras are ignored, as OpenAI does,
except where a field we cannot honour changes the answer: `n > 1`, `logprobs`, tools). Every
bound is checked here so that a bad parameter becomes a 400 with the field's name, never a 500.
Responses are built with plain functions so the ingress stays a thin mapping layer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_TEMPERATURE = 1e-4  # lower temperatures are greedy decoding (they pick the argmax anyway)


class ChatMessage(BaseModel):
    """One chat turn. `content` may be a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # engines seed a 64-bit generator
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past EOS (benchmarks)

    @field_validator("temperature")
    @classmethod
    def _greedy_below_min(cls, value: float) -> float:
        return 0.0 if value < MIN_TEMPERATURE else value  # logits / 1e-300 overflow to inf and poison the batch's sampling

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], int):
            return value  # token ids, as OpenAI allows
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request (a string, a list of token ids, or a list of one of those)")
        if isinstance(value, list) and value[0] == []:
            raise ValueError("prompt must not be an empty list of token ids")
        return value

    def prompt_token_ids(self) -> list[int] | None:
        """The prompt as token ids when the client sent ids, else None."""
        p = self.prompt[0] if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], list) else self.prompt
        return list(p) if isinstance(p, list) and p and isinstance(p[0], int) else None

    def prompt_text(self) -> str:
        if self.prompt_token_ids() is not None:
            return ""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, created: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, created: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid: str, model: str, obj: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(model_id: str, owned_by: str, **extra: Any) -> dict:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": owned_by, **extra}
