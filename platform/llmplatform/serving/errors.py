"""OpenAI-style errors for the HTTP API.

`ApiError` carries an HTTP status and OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`. Every failure a client can cause is raised
as one of these, so the ingress never answers a user mistake with a 500.
"""

from __future__ import annotations

from pydantic import ValidationError


class ApiError(Exception):
    """An error the client gets as OpenAI JSON with `status`; `headers` e.g. Retry-After."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "invalid_request_error", None, "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"})


def overloaded(retry_after_s: int, queued: int, limit: int) -> ApiError:
    return ApiError(429, f"Server busy: {queued} requests in flight or queued (limit {limit}). Retry after {retry_after_s} s.",
                    "rate_limit_error", None, "queue_full", {"Retry-After": str(retry_after_s)})


def unavailable(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, message, "server_error", None, "unavailable", {"Retry-After": str(retry_after_s)})


def replica_failed(message: str, retry_after_s: int = 1) -> ApiError:
    """The engine replica serving the request died or became unreachable (it is being replaced)."""
    return ApiError(503, message, "server_error", None, "replica_unavailable", {"Retry-After": str(retry_after_s)})


def too_large(size: int | None, limit: int) -> ApiError:
    got = f"{size} bytes" if size is not None else "more"
    return ApiError(413, f"Request body is too large: {got}, the limit is {limit} bytes (limits.max_request_bytes).",
                    "invalid_request_error", None, "request_too_large")


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"Request exceeded the deployment's request_timeout_s ({seconds:g} s).", "server_error", None, "timeout")


def context_too_long(prompt_tokens: int, max_tokens: int, max_model_len: int) -> ApiError:
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or max_tokens.", "max_tokens", "context_length_exceeded")


def prompt_too_long(min_prompt_tokens: int, chars: int, max_model_len: int) -> ApiError:
    """For a prompt so long that it is refused without tokenizing it (a lower bound on its tokens)."""
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt of {chars} characters "
        f"has at least {min_prompt_tokens} tokens. Please reduce the length of the messages or prompt.",
        "messages", "context_length_exceeded")


def from_validation(exc: ValidationError) -> ApiError:
    """The first pydantic problem, named by its field path."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = len(exc.errors()) - 1
    extra = f" (and {more} more problem(s))" if more else ""
    return bad_request(f"Invalid value for '{where}': {first['msg']}{extra}", where, "invalid_value")
