"""Canary rules, pure: the canary state of an alias, its transitions, sticky bucketing, the guard.

A canary splits the traffic of `NAME@ALIAS` between the alias holder (the baseline) and a
candidate version with a weight in percent. The state is one JSON document (stored by
`llmplatform.registry.canary` as the registered-model tag `platform.canary.<alias>`); every
function here is pure so the CLI, the serving replica and the tests share one meaning.

Bucketing: a request's `user` is hashed with the model name into 0..9999; buckets below
`weight * 100` go to the candidate. Raising the weight only adds buckets, so a user on the
candidate stays there. Requests without `user` are bucketed at random.

Guard: `--abort-if 'error_rate>0.02'`, `--abort-if 'ttft_p95>2*baseline'`: a metric of the
candidate's requests in the last `--window`, compared with a number or a multiple of the same
metric of the baseline's requests in that window.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import asdict, dataclass, field, replace

from llmplatform.errors import RegistryError

BUCKETS = 10_000
METRICS = ("error_rate", "ttft_p50", "ttft_p95")
MIN_GUARD_REQUESTS = 5  # the guard judges a metric only once the candidate has this many requests in the window
_COND = re.compile(r"^\s*(?P<metric>[a-z_0-9]+)\s*(?P<op>>=|<=|>|<)\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<base>\*\s*baseline)?\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class CanaryError(RegistryError):
    """A canary command or flag that can't be applied; the message names the flag and the fix."""


@dataclass(frozen=True)
class Condition:
    """One `--abort-if`: abort when `metric op threshold` (threshold x baseline's metric if relative)."""

    metric: str
    op: str
    threshold: float
    relative: bool = False
    text: str = ""

    def limit(self, baseline: float | None) -> float | None:
        """The number the candidate's metric is compared with (None: no baseline to compare with yet)."""
        if not self.relative:
            return self.threshold
        return None if baseline is None else self.threshold * baseline

    def violated(self, value: float | None, baseline: float | None) -> bool:
        limit = self.limit(baseline)
        if value is None or limit is None:
            return False
        return {">": value > limit, ">=": value >= limit, "<": value < limit, "<=": value <= limit}[self.op]


@dataclass(frozen=True)
class Guard:
    abort_if: tuple[Condition, ...] = ()
    window_s: float = 300.0
    promote_after_s: float | None = None

    def to_dict(self) -> dict:
        return {"abort_if": [c.text for c in self.abort_if], "window_s": self.window_s, "promote_after_s": self.promote_after_s}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Guard":
        d = d or {}
        return cls(tuple(parse_condition(t) for t in d.get("abort_if", [])), float(d.get("window_s", 300.0)),
                   d.get("promote_after_s"))


@dataclass(frozen=True)
class CanaryState:
    """The canary of one alias: `weight`% of its requests go to `version`, the rest to `baseline`."""

    alias: str
    version: int
    baseline: int
    weight: float
    started: float  # unix time the canary started (the guard's promote-after clock)
    guard: Guard = field(default_factory=Guard)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["guard"] = self.guard.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CanaryState":
        return cls(alias=d["alias"], version=int(d["version"]), baseline=int(d["baseline"]), weight=float(d["weight"]),
                   started=float(d["started"]), guard=Guard.from_dict(d.get("guard")))


# ---------------------------------------------------------------------------- flags


def parse_condition(text: str, flag: str = "--abort-if") -> Condition:
    """`error_rate>0.02` or `ttft_p95>2*baseline` -> Condition; CanaryError naming `flag` otherwise."""
    m = _COND.match(text or "")
    if not m:
        raise CanaryError(f"{flag} {text!r}: write METRIC OP NUMBER or METRIC OP NUMBER*baseline, "
                          f"e.g. 'error_rate>0.02' or 'ttft_p95>2*baseline' (METRIC: {', '.join(METRICS)}; OP: > >= < <=)")
    if m["metric"] not in METRICS:
        raise CanaryError(f"{flag} {text!r}: unknown metric {m['metric']!r}; use one of {', '.join(METRICS)}")
    if m["metric"] == "error_rate" and not m["base"] and float(m["num"]) > 1:
        raise CanaryError(f"{flag} {text!r}: error_rate is a fraction (0..1); write e.g. 'error_rate>0.02' for 2%")
    return Condition(m["metric"], m["op"], float(m["num"]), bool(m["base"]), text.strip())


def parse_duration(text: str, flag: str) -> float:
    """`30s`, `5m`, `1h`, `250ms` or plain seconds -> seconds; CanaryError naming `flag` otherwise."""
    m = _DURATION.match(str(text))
    if not m or float(m[1]) <= 0:
        raise CanaryError(f"{flag} {text!r}: give a positive duration such as 30s, 5m or 1h")
    return float(m[1]) * _UNIT_S[m[2]]


def parse_guard(abort_if: list[str], window: str | None, promote_after: str | None) -> Guard:
    """The guard from the CLI flags; every bad flag is reported at once."""
    problems, conds = [], []
    for text in abort_if:
        try:
            conds.append(parse_condition(text))
        except CanaryError as exc:
            problems.append(str(exc))
    window_s = promote_s = None
    try:
        window_s = parse_duration(window, "--window") if window else 300.0
    except CanaryError as exc:
        problems.append(str(exc))
    try:
        promote_s = parse_duration(promote_after, "--promote-after") if promote_after else None
    except CanaryError as exc:
        problems.append(str(exc))
    if problems:
        raise CanaryError("; ".join(problems))
    return Guard(tuple(conds), window_s, promote_s)


def check_weight(weight: float, flag: str = "--canary") -> float:
    if not 0 < float(weight) < 100:
        raise CanaryError(f"{flag} {weight:g}: a canary weight is a percentage above 0 and below 100 "
                          "(complete it with `models promote ... --complete`, abort it with `models rollback`)")
    return float(weight)


# ---------------------------------------------------------------------------- transitions


def start(current: CanaryState | None, name: str, alias: str, holder: int | None, version: int, weight: float,
          guard: Guard, now: float) -> CanaryState:
    """A new canary of `version` on `name@alias`, held by `holder`."""
    check_weight(weight)
    if current is not None:
        raise CanaryError(f"{name}@{alias} already has a canary of version {current.version} at {current.weight:g}%; "
                          f"raise it with `models canary {name} --alias {alias} --weight W`, complete it with "
                          f"`models promote {name} --version {current.version} --to {alias} --complete`, or abort it "
                          f"with `models rollback {name} --alias {alias}`")
    if holder is None:
        raise CanaryError(f"{name}@{alias} has no holder to compare with; promote a version first (without --canary)")
    if holder == version:
        raise CanaryError(f"{name}@{alias} is already held by version {version}; a canary needs another version")
    return CanaryState(alias, int(version), int(holder), weight, now, guard)


def set_weight(current: CanaryState | None, name: str, alias: str, weight: float) -> CanaryState:
    check_weight(weight, "--weight")
    return replace(_require(current, name, alias), weight=float(weight))


def complete(current: CanaryState | None, name: str, alias: str, version: int | None = None) -> CanaryState:
    """The canary to complete (the alias then moves to its version); checks `version` matches."""
    cur = _require(current, name, alias)
    if version is not None and int(version) != cur.version:
        raise CanaryError(f"--version {version}: the canary on {name}@{alias} is version {cur.version}; "
                          f"complete it with --version {cur.version}")
    return cur


def _require(current: CanaryState | None, name: str, alias: str) -> CanaryState:
    if current is None:
        raise CanaryError(f"{name}@{alias} has no canary; start one with "
                          f"`models promote {name} --version N --to {alias} --canary 10`")
    return current


# ---------------------------------------------------------------------------- traffic


def bucket(name: str, user: str) -> int:
    """The stable bucket (0..BUCKETS-1) of a user for a model (same on every replica and restart)."""
    digest = hashlib.sha256(f"{name}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def goes_to_canary(name: str, user: str | None, weight: float, rng: random.Random | None = None) -> bool:
    """Whether this request runs on the candidate: sticky by `user`, random without one."""
    b = bucket(name, user) if user else (rng or random).randrange(BUCKETS)
    return b < round(weight * BUCKETS / 100)


# ---------------------------------------------------------------------------- guard


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def summarize(requests: int, errors: int, ttfts: list[float]) -> dict:
    """Window metrics of one version: requests, error_rate, TTFT p50/p95 (s)."""
    return {"requests": requests, "errors": errors, "error_rate": errors / requests if requests else None,
            "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95)}


def violations(guard: Guard, candidate: dict, baseline: dict) -> list[str]:
    """Why the guard fails on these window summaries (empty: it holds). Judged only once the
    candidate has MIN_GUARD_REQUESTS requests in the window."""
    if (candidate.get("requests") or 0) < MIN_GUARD_REQUESTS:
        return []
    out = []
    for c in guard.abort_if:
        value, base = candidate.get(c.metric), baseline.get(c.metric)
        if c.violated(value, base):
            limit = c.limit(base)
            out.append(f"{c.text}: candidate {c.metric}={value:.4g} vs limit {limit:.4g}"
                       + (f" (baseline {base:.4g})" if c.relative else "")
                       + f" over {candidate['requests']} request(s) in the last {guard.window_s:g} s")
    return out


def due_for_promotion(state: CanaryState, now: float) -> bool:
    """The canary ran `promote_after` without the guard aborting it."""
    return state.guard.promote_after_s is not None and now - state.started >= state.guard.promote_after_s
