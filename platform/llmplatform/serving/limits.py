"""Per-key request and token limits, shared by all ingress replicas of a deployment.

A key's `rpm` (requests per minute) and `tpm` (prompt + completion tokens per minute), from its
line in the keys file (`llmplatform.serving.keys`), are token buckets: each holds up to one
minute's allowance and refills continuously (rpm/60 per second), so a key may burst up to its
limit and then runs at the limit's rate. A request is admitted when its key's request bucket has
a whole request left and its token bucket is not in debt; its tokens are charged when it ends
(its actual prompt + completion tokens), so one large request may take the token bucket below
zero and later requests wait until it refills. Refused requests get 429 with Retry-After (the
seconds until the bucket holds enough again).

The buckets live in one `limiter` deployment of the application (one replica, no CPU reserved):
every ingress replica asks it, so the limit is the deployment's, not each replica's. Only keys
that have a limit cost a call (one round trip to the limiter per request at admission, and a
fire-and-forget charge at the end); keys without limits never reach it. A limiter that is
restarted starts with full buckets.
"""

from __future__ import annotations

import math
import time

from ray import serve


class TokenBuckets:
    """Request and token buckets per key name (pure: the caller passes the clock, in seconds)."""

    def __init__(self) -> None:
        self.levels: dict[tuple[str, str], tuple[float, float]] = {}  # (name, "rpm"|"tpm") -> (level, at)

    def _level(self, name: str, kind: str, per_minute: int, now: float) -> float:
        level, at = self.levels.get((name, kind), (float(per_minute), now))
        return min(float(per_minute), level + (now - at) * per_minute / 60.0)

    def admit(self, name: str, rpm: int | None, tpm: int | None, now: float) -> float | None:
        """None when admitted (one request taken), else the seconds to wait before asking again."""
        waits = []
        if rpm is not None:
            level = self._level(name, "rpm", rpm, now)
            if level < 1.0:
                waits.append((1.0 - level) * 60.0 / rpm)
        if tpm is not None:
            level = self._level(name, "tpm", tpm, now)
            if level <= 0.0:
                waits.append((1.0 - level) * 60.0 / tpm)
        if waits:
            return max(waits)
        if rpm is not None:
            self.levels[(name, "rpm")] = (self._level(name, "rpm", rpm, now) - 1.0, now)
        return None

    def charge(self, name: str, tokens: int, tpm: int | None, now: float) -> None:
        """Take a finished request's tokens from the key's token bucket (it may go below zero)."""
        if tpm is not None:
            self.levels[(name, "tpm")] = (self._level(name, "tpm", tpm, now) - tokens, now)


def retry_after_header(wait_s: float) -> str:
    """Retry-After in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))


@serve.deployment(name="limiter", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
                  health_check_period_s=10.0)
class RateLimiter:
    """The deployment's buckets: ingress replicas call `admit` before a limited key's request and
    `charge` after it."""

    def __init__(self) -> None:
        self.buckets = TokenBuckets()

    def admit(self, name: str, rpm: int | None, tpm: int | None) -> float | None:
        return self.buckets.admit(name, rpm, tpm, time.monotonic())

    def charge(self, name: str, tokens: int, tpm: int | None) -> None:
        self.buckets.charge(name, tokens, tpm, time.monotonic())
