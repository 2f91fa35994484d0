"""What an ingress replica knows about who calls it: the caller's key identity, its per-minute
limits, and the usage it records.

`identify` maps the bearer key to its `KeyIdentity` (keys from the deployer's env, then the
keys file; see `llmplatform.serving.keys`); `admit` asks the deployment's limiter for keys that
have limits (429 + Retry-After when over; a limiter that does not answer within
LIMITER_TIMEOUT_S, e.g. while Serve restarts it, admits the request); `finished` / `failed`
count the request in the usage store's tally (`llmplatform.serving.usage`) and charge its
tokens to the key's limit. Nothing here does I/O on the event loop except the limiter round
trip for limited keys.
"""

from __future__ import annotations

import asyncio
import logging
import time

from llmplatform.serving import errors as E
from llmplatform.serving.keys import KeyIdentity, KeysFile, env_keys, hash_key, parse_keys_table
from llmplatform.serving.limits import retry_after_header
from llmplatform.serving.usage import UsageRecorder, usage_db_url

log = logging.getLogger(__name__)
ANONYMOUS = KeyIdentity("anonymous")  # auth off: every request is this identity
UNAUTHENTICATED = "unauthenticated"  # the usage `key` of requests refused with 401
LIMITER_TIMEOUT_S = 2.0  # a limiter slower than this (restarting) admits the request: limits fail open


async def _awaited(response):
    return await response


def rate_limited(name: str, wait_s: float) -> E.ApiError:
    return E.ApiError(429, f"Rate limit reached for key {name!r}: its requests or tokens per minute are used up. "
                      f"Retry after {retry_after_header(wait_s)} s.", "rate_limit_error", None, "rate_limit_exceeded",
                      {"Retry-After": retry_after_header(wait_s)})


class Accounting:
    def __init__(self, plan, key_lines: list[str] | None, limiter=None, metrics=None, replica: str = ""):
        auth = plan.spec.auth
        self.enabled = auth.enabled
        # the deployer's env (as hash lines), then this replica's env
        self.static_keys = {**parse_keys_table("\n".join(key_lines or []), "deployer's keys"), **env_keys(auth)}
        self.keys_file = KeysFile(plan["api_keys_file"])
        if self.enabled:
            self.keys_file.table()  # read at start, so a bad file fails here rather than on the first request
        self.limiter = limiter
        self._warned = float("-inf")
        self.metrics = metrics
        url = usage_db_url()
        self.usage = UsageRecorder(url, plan.spec.name, replica) if url else None

    def identify(self, authorization: str) -> KeyIdentity:
        """The identity of an `Authorization` header value; 401 when auth is on and the key is unknown."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
            self._count_auth_failure("missing_key")
            raise E.unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        given = hash_key(authorization[7:])
        # A dict lookup by the key's SHA-256: its timing tells nothing about any stored key's text.
        ident = self.static_keys.get(given) or self.keys_file.lookup(given)  # the env's keys, then the file's
        if ident is None:
            self._count_auth_failure("invalid_key")
            raise E.unauthorized("Incorrect API key provided.")
        return ident

    def _count_auth_failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_failures.labels(reason).inc()

    async def admit(self, ident: KeyIdentity) -> None:
        """429 + Retry-After when `ident` is over a per-minute limit (shared by all replicas)."""
        if not ident.limited or self.limiter is None:
            return
        try:
            wait = await asyncio.wait_for(_awaited(self.limiter.admit.remote(ident.name, ident.rpm, ident.tpm)), LIMITER_TIMEOUT_S)
        except Exception as exc:  # the limiter is restarting or gone: serve rather than refuse (fail open)
            now = time.monotonic()
            if now - self._warned > 60:
                self._warned = now
                log.warning("limiter did not answer (%s: %s); admitting limited keys unchecked", type(exc).__name__, exc)
            return
        if wait is not None:
            if self.metrics is not None:
                self.metrics.rejected.labels("rate_limited").inc()  # no key label: key names stay out of metrics
            raise rate_limited(ident.name, wait)

    def finished(self, ident: KeyIdentity, model: str, adapter: str, prompt_tokens: int, completion_tokens: int) -> None:
        if self.usage is not None:
            self.usage.record(ident.name, model, adapter, prompt_tokens, completion_tokens)
        if ident.tpm is not None and self.limiter is not None:
            self.limiter.charge.remote(ident.name, prompt_tokens + completion_tokens, ident.tpm)  # not awaited

    def failed(self, ident: KeyIdentity | None, model: str, adapter: str) -> None:
        if self.usage is not None:
            self.usage.record(ident.name if ident else UNAUTHENTICATED, model, adapter, error=True)

    def close(self) -> None:
        if self.usage is not None:
            self.usage.close()
