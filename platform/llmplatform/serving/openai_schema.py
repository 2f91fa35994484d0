"""OpenAI-compatible request and response bodies (pydantic v2), and the table of request fields.

`FIELDS` is the one table of what each field of OpenAI's chat completions and completions
requests does here, per engine: it works, or it is refused with a 400 that names the field and
the engine (no field is silently dropped). `check_fields` applies it to a request body before
validation; docs/openai-api.md is generated from it (llmplatform.docgen), so the docs and the
behaviour can't drift. A refused field sent with a value that changes nothing (null, `n: 1`,
`store: false`, `response_format: {"type": "text"}`, ...) is accepted. Every bound is checked
here so that a bad parameter becomes a 400 with the field's name, never a 500. Responses are
built with plain functions so the ingress stays a thin mapping layer.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MIN_TEMPERATURE = 1e-4  # lower temperatures are greedy decoding (they pick the argmax anyway)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs bound; vLLM's default max_logprobs)
ENGINES = ("hf", "vllm")
WORKS, REFUSED, PARTLY = "works", "refused", "partly"  # partly: some values are refused (see the note)
CHAT, COMPLETIONS = "chat", "completions"
BOTH = (CHAT, COMPLETIONS)


@dataclass(frozen=True)
class FieldRule:
    """One request field: where it is accepted, whether each engine honours it, and why."""

    endpoints: tuple[str, ...]
    hf: str  # WORKS or REFUSED
    vllm: str
    note: str  # what it does here, or why it is refused
    neutral: tuple = ()  # values accepted even where refused: they change nothing
    refuse_if: tuple = ()  # (engine, predicate(value), reason): values one engine refuses where the field works

    def support(self, engine: str) -> str:
        base = getattr(self, engine)
        return PARTLY if base == WORKS and any(e == engine for e, _, _ in self.refuse_if) else base

    def refusal(self, engine: str, value: Any) -> str | None:
        """Why `engine` refuses `value` for this field, or None when it honours it."""
        if value is None or value in self.neutral:
            return None
        if getattr(self, engine) == REFUSED:
            return self.note
        return next((why for e, refused, why in self.refuse_if if e == engine and refused(value)), None)


def _both(note: str, endpoints: tuple[str, ...] = BOTH) -> FieldRule:
    return FieldRule(endpoints, WORKS, WORKS, note)


def _refused(note: str, endpoints: tuple[str, ...] = (CHAT,), neutral: tuple = ()) -> FieldRule:
    return FieldRule(endpoints, REFUSED, REFUSED, note, neutral)


FIELDS: dict[str, FieldRule] = {
    "model": _both("a served name: the base, `base:adapter`, `name@alias`, `name/version`, or the deployment name"),
    "messages": _both("roles `system`, `developer` (rendered as system), `user`, `assistant`; text content only "
                      "(other content parts and message fields such as `name` or `tool_calls` are refused)", (CHAT,)),
    "prompt": _both("one prompt: a string, a list of token ids, or a list of one of those", (COMPLETIONS,)),
    "max_tokens": _both("tokens to generate; default `limits.default_max_tokens`, refused past `max_model_len`"),
    "max_completion_tokens": _both("alias of `max_tokens` (wins when both are set)"),
    "temperature": _both("0..2; below 1e-4 decodes greedily"),
    "top_p": _both("nucleus sampling, (0, 1]"),
    "stop": _both("up to 4 stop strings; the text ends before the first"),
    "seed": _both("seeds sampling: the same seed and request give the same text"),
    "stream": _both("server-sent events ending in `data: [DONE]`"),
    "stream_options": _both("`include_usage`: a last chunk with `usage` and no choices"),
    "n": _both("choices per request, up to `limits.max_n` (default 4); with a seed, choice i samples with seed + i"),
    "logprobs": _both(f"chat: `true` returns each token's log-probability (of the model's raw distribution); "
                      f"completions: an integer 0..{MAX_LOGPROBS}, the number of alternatives per token"),
    "top_logprobs": _both(f"0..{MAX_LOGPROBS} alternatives per token; needs `logprobs: true`", (CHAT,)),
    "presence_penalty": _both("-2..2, subtracted once from the logit of every token already generated"),
    "frequency_penalty": _both("-2..2, subtracted from a token's logit per time it was generated"),
    "logit_bias": _both("token id -> bias (-100..100) added to that token's logit"),
    "user": _both("recorded with the request as metadata (usage accounting); does not change the output"),
    "safety_identifier": _both("as `user`", (CHAT,)),
    "prompt_cache_key": _both("accepted; a cache-routing hint with no effect on the output", (CHAT,)),
    "parallel_tool_calls": _both("accepted; it means nothing without `tools` (refused)", (CHAT,)),
    "echo": _both("prepends the prompt to the text; refused together with `logprobs`", (COMPLETIONS,)),
    "ignore_eos": _both("vLLM's extension: generate `max_tokens` even past the end-of-sequence token (benchmarks)"),
    "response_format": FieldRule((CHAT,), WORKS, WORKS,
                                 "`json_object`: the output is one JSON object, no whitespace outside strings, closed within "
                                 "`max_tokens` (finish_reason `stop`; `{}` needs 2 tokens, 3 on vLLM). Constrained decoding: hf, a "
                                 "JSON automaton; vLLM, its structured outputs (xgrammar) plus a logits processor with the same "
                                 "automaton that closes the object in time (vLLM on CPU; on GPUs vLLM's Model Runner V2 takes "
                                 "no such processor: valid and compact, but a model may still be cut at `max_tokens`). `json_schema`: vLLM only, no whitespace either; the "
                                 "output follows the schema, but only a schema that bounds its output (enums, `maxLength`) is sure "
                                 "to end within `max_tokens`", ({"type": "text"},),
                                 (("hf", lambda v: isinstance(v, dict) and v.get("type") == "json_schema",
                                   "`json_schema` needs a schema grammar, which the hf engine lacks (`json_object` works)"),)),
    "tools": _refused("the served chat templates (Llama 2) have no tool support, and no tool-call parser is configured",
                      neutral=([],)),
    "tool_choice": _refused("as `tools`", neutral=("none", "auto")),
    "functions": _refused("deprecated form of `tools`; refused as `tools`", neutral=([],)),
    "function_call": _refused("deprecated form of `tool_choice`; refused as `tools`", neutral=("none", "auto")),
    "best_of": _refused("server-side best-of-n sampling is not implemented; use `n`", (COMPLETIONS,), (1,)),
    "suffix": _refused("insertion (fill-in-the-middle) is not supported by Llama 2", (COMPLETIONS,), ("",)),
    "store": _refused("completions are never stored", neutral=(False,)),
    "metadata": _refused("only meaningful with `store` (refused); use `user` to label requests", neutral=({},)),
    "modalities": _refused("text output only", neutral=(["text"],)),
    "audio": _refused("text output only"),
    "prediction": _refused("predicted outputs (speculative decoding from a client draft) are not supported"),
    "web_search_options": _refused("no web search"),
    "reasoning_effort": _refused("Llama 2 is not a reasoning model"),
    "verbosity": _refused("Llama 2 has no verbosity control"),
    "service_tier": _refused("one service tier", neutral=("auto", "default")),
}


class FieldRefused(ValueError):
    """A request field this engine does not honour (or a bad combination): 400 naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_fields(body: dict, endpoint: str, engine: str) -> None:
    """Refuse every field of `body` that `FIELDS` does not accept on `endpoint` with `engine`."""
    path = "/v1/chat/completions" if endpoint == CHAT else "/v1/completions"
    for name, value in body.items():
        rule = FIELDS.get(name)
        if rule is None or endpoint not in rule.endpoints:
            raise FieldRefused(name, f"Unrecognized request argument supplied: '{name}' is not a field of {path} "
                                     f"on this server (engine {engine}); docs/openai-api.md lists the fields.")
        why = rule.refusal(engine, value)
        if why:
            raise FieldRefused(name, f"'{name}' is not supported by engine {engine}: {why}.")
    if endpoint == COMPLETIONS and body.get("echo") and body.get("logprobs") is not None:
        raise FieldRefused("echo", f"'echo' together with 'logprobs' is not supported by engine {engine}: "
                                   "prompt tokens have no log-probabilities here; drop one of them.")


def _engine(info: ValidationInfo) -> str:
    return (info.context or {}).get("engine", "this engine")


MESSAGE_NEUTRAL = {"refusal", "tool_calls", "function_call", "audio", "annotations"}  # echoed back as null/[] by clients


class ChatMessage(BaseModel):
    """One chat turn. `content` is a string or OpenAI's list of text parts; `developer` is a system turn."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @model_validator(mode="before")
    @classmethod
    def _only_honoured_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if key in ("role", "content") or value is None or (key in MESSAGE_NEUTRAL and value in ([], "")):
                    continue
                raise ValueError(f"message field '{key}' is not supported by engine {_engine(info)} (only role and text content)")
        return data

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: Any, info: ValidationInfo) -> Any:
        for part in value if isinstance(value, list) else []:
            kind = part.get("type", "text")
            if kind != "text":
                raise ValueError(f"content part type {kind!r} is not supported by engine {_engine(info)} (text parts only)")
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")

    def template_role(self) -> str:
        """The role the chat template renders: OpenAI's `developer` is the system prompt."""
        return "system" if self.role == "developer" else self.role


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (those `FIELDS` lets through)."""

    model_config = ConfigDict(extra="ignore")  # check_fields has refused every field not in FIELDS
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # engines seed a 64-bit generator
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)  # the upper bound is the deployment's limits.max_n (engine_fields)
    user: str | None = None
    safety_identifier: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
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

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value and (min(value) < 0 or any(not -100 <= b <= 100 for b in value.values())):
            raise ValueError("keys must be token ids (>= 0) and biases in -100..100")
        return value or None

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def top_k_logprobs(self) -> int | None:
        """Alternatives per token the engine returns, or None when the request wants no logprobs."""
        return None

    def request_metadata(self) -> dict:
        """What the request says about its caller (for usage accounting), never sent to an engine."""
        return {"user": self.user or self.safety_identifier}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("response_format")
    @classmethod
    def _format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = (value or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
        if kind == "json_schema" and not isinstance((value.get("json_schema") or {}).get("schema"), dict):
            raise ValueError("json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return None if kind == "text" else value

    def top_k_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

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

    def top_k_logprobs(self) -> int | None:
        return self.logprobs


def engine_fields(req: SamplingFields, vocab_size: int, max_n: int) -> dict:
    """The request's generation settings beyond the basic ones, as GenerationRequest fields;
    FieldRefused for what needs the deployment to judge (its `limits.max_n`, its vocabulary)."""
    if req.n > max_n:
        raise FieldRefused("n", f"'n' is {req.n}, above this deployment's limit of {max_n} choices per request (limits.max_n).")
    if req.logit_bias and max(req.logit_bias) >= vocab_size:
        raise FieldRefused("logit_bias", f"'logit_bias' names token id {max(req.logit_bias)}; this model's token ids are 0..{vocab_size - 1}.")
    return {"n": req.n, "logprobs": req.top_k_logprobs(), "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty, "logit_bias": dict(req.logit_bias or {}),
            "response_format": getattr(req, "response_format", None)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------- logprobs
# Engines send per token {"id", "logprob", "top": [[id, logprob], ...]}; `token_text(id)` gives a
# token's (text, UTF-8 bytes): a byte-fallback token is one byte, perhaps part of a character.


def _entry(token_text: Callable[[int], tuple[str, list[int]]], tid: int, lp: float) -> dict:
    text, raw = token_text(tid)
    return {"token": text, "logprob": lp, "bytes": raw}


def token_text(piece: str) -> tuple[str, list[int]]:
    """A SentencePiece piece as logprobs show it: (text, its UTF-8 bytes); the word marker is a
    space, and a byte-fallback piece `<0xNN>` is that one byte (text: the character, or U+FFFD)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            raw = bytes([int(piece[3:5], 16)])
            return raw.decode("utf-8", "replace"), list(raw)
        except ValueError:
            pass
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def chat_logprobs(entries: list[dict], token_text: Callable[[int], tuple[str, list[int]]]) -> dict:
    return {"content": [{**_entry(token_text, e["id"], e["logprob"]),
                         "top_logprobs": [_entry(token_text, tid, lp) for tid, lp in e["top"]]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[dict], token_text: Callable[[int], tuple[str, list[int]]], offset: int = 0) -> dict:
    tokens = [token_text(e["id"])[0] for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(tid)[0]: lp for tid, lp in e["top"]} for e in entries], "text_offset": offsets}


# ---------------------------------------------------------------------------- responses


def chat_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": logprobs}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  choices: list[dict] | None = None) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": choices or [chat_choice(0, text, finish)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, created: int, index: int = 0,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                        choices: list[dict] | None = None) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices or [completion_choice(0, text, finish)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, created: int, index: int = 0,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}


def usage_chunk(rid: str, model: str, obj: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(model_id: str, owned_by: str, **extra: Any) -> dict:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": owned_by, **extra}
