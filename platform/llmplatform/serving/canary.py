"""The serving side of canaries: which version a request runs on, per-version stats, the guard.

The ingress asks `choose(target, user)` after the model lookup: a target whose alias has a canary
(`Target.split`, kept current by the registry poller) goes to the candidate for the request's
bucket (`canary_rules.goes_to_canary`, sticky by the `user` field), else stays on the holder.
`VersionStats` keeps, per served version, totals (requests, errors, tokens) and a time-stamped
window of recent requests for the guard and for `serve status`.

The guard runs in each ingress replica's registry poller (`guard_actions`): it judges the
candidate's requests in the last `--window` against `--abort-if`, and aborts the canary in the
registry (recording why) or completes it after `--promote-after`. On Kubernetes the same
poller runs in the RayService's ingress replicas; each judges the traffic it saw, and the first
to act wins (abort/complete of a canary that is gone is a no-op).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from llmplatform.registry import canary_rules as rules

MAX_SAMPLES = 100_000  # recent requests remembered per version (bounds memory under heavy load)


@dataclass(frozen=True)
class Split:
    """A running canary as the serving table holds it: the candidate's target and the state."""

    target: object  # adapters.Target of the candidate version
    state: rules.CanaryState


# An engine error is the version's fault even as a 4xx: the hf engine answers 400 `engine_error` when a
# version's adapter can't be loaded (the ingress has already refused the client's own mistakes).
VERSION_ERROR_CODES = {"engine_error", "engine_failure"}


def version_failed(status: int, code: str | None) -> bool:
    """Whether an error answer counts against the version that ran it (the guard's error_rate)."""
    return status >= 500 or code in VERSION_ERROR_CODES  # queue-full 429s and the client's own 4xx don't count


def choose(target, user: str | None):
    """The target this request runs on: the canary's candidate or the holder (`target` itself)."""
    split = getattr(target, "split", None)
    if split is None:
        return target
    name = (target.adapter_id or "").split("/")[0]
    if rules.goes_to_canary(name, user, split.state.weight):
        return replace(split.target, model=target.model, served_as=target.served_as, split=None)
    return replace(target, split=None)


def answered_as(target, requested: str) -> str:
    """The `model` a response names: NAME/VERSION for registry versions, else what was asked."""
    return target.adapter_id if getattr(target, "version", None) is not None and target.adapter_id else requested


class VersionStats:
    """Per served version (`NAME/VERSION`, a local adapter id, or the base): totals and a window."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self.totals: dict[str, dict] = {}
        self.recent: dict[str, deque] = {}  # key -> (time, ok, ttft s or None)

    def record(self, key: str, ok: bool, ttft_s: float | None = None, tokens: int = 0) -> None:
        with self._lock:
            t = self.totals.setdefault(key, {"requests": 0, "errors": 0, "tokens": 0})
            t["requests"] += 1
            t["errors"] += 0 if ok else 1
            t["tokens"] += tokens
            self.recent.setdefault(key, deque(maxlen=MAX_SAMPLES)).append((self.clock(), ok, ttft_s))

    def window(self, key: str, seconds: float, since: float | None = None) -> dict:
        """Window summary (requests, errors, error_rate, ttft_p50/p95) of the last `seconds` (and after `since`)."""
        start = max(self.clock() - seconds, since or 0.0)
        with self._lock:
            rows = [r for r in self.recent.get(key, ()) if r[0] >= start]
        ttfts = [r[2] for r in rows if r[2] is not None]
        return rules.summarize(len(rows), sum(1 for r in rows if not r[1]), ttfts)

    def report(self, seconds: float = 300.0) -> dict:
        """For `serve status`: per version, totals and the last `seconds`' TTFT percentiles."""
        with self._lock:
            keys = list(self.totals)
        out = {}
        for key in keys:
            w = self.window(key, seconds)
            out[key] = {**self.totals[key], "window_s": seconds, "ttft_p50_s": w["ttft_p50"], "ttft_p95_s": w["ttft_p95"],
                        "window_requests": w["requests"], "window_error_rate": w["error_rate"]}
        return out


def guard_actions(name: str, state: rules.CanaryState, stats: VersionStats, now: float) -> tuple[str, str] | None:
    """("abort", why) when the guard fails, ("complete", why) when promote-after passed, else None.
    Only requests since the canary started count (the baseline's too)."""
    guard = state.guard
    cand = stats.window(f"{name}/{state.version}", guard.window_s, since=state.started)
    base = stats.window(f"{name}/{state.baseline}", guard.window_s, since=state.started)
    why = rules.violations(guard, cand, base)
    if why:
        return "abort", "guard: " + "; ".join(why)
    if rules.due_for_promotion(state, now):
        return "complete", f"guard held for {guard.promote_after_s:g} s (promote-after)"
    return None
