"""Canary rules: bucketing, guard flags (errors name the flag), state transitions, the guard's verdict."""

from __future__ import annotations

import random

import pytest

from llmplatform.registry import canary_rules as R


def test_bucketing_is_sticky_and_close_to_the_weight():
    users = [f"user-{i}" for i in range(20_000)]
    share = sum(R.goes_to_canary("bot", u, 10) for u in users) / len(users)
    assert abs(share - 0.10) < 0.01
    assert all(R.goes_to_canary("bot", "alice", 30) == R.goes_to_canary("bot", "alice", 30) for _ in range(5))


def test_raising_the_weight_keeps_canary_users_on_the_canary():
    users = [f"u{i}" for i in range(5000)]
    at10 = {u for u in users if R.goes_to_canary("bot", u, 10)}
    at50 = {u for u in users if R.goes_to_canary("bot", u, 50)}
    assert at10 < at50 and 0.45 < len(at50) / len(users) < 0.55


def test_requests_without_user_are_split_at_random_by_weight():
    rng = random.Random(7)
    share = sum(R.goes_to_canary("bot", None, 25, rng) for _ in range(20_000)) / 20_000
    assert abs(share - 0.25) < 0.015


@pytest.mark.parametrize("text, metric, op, threshold, relative", [
    ("error_rate>0.02", "error_rate", ">", 0.02, False),
    ("ttft_p95 > 2*baseline", "ttft_p95", ">", 2.0, True),
    ("ttft_p50>=1.5 * baseline", "ttft_p50", ">=", 1.5, True),
])
def test_conditions_parse(text, metric, op, threshold, relative):
    c = R.parse_condition(text)
    assert (c.metric, c.op, c.threshold, c.relative) == (metric, op, threshold, relative)


@pytest.mark.parametrize("text, says", [
    ("latency>2", "unknown metric 'latency'"),
    ("error_rate=0.1", "METRIC OP NUMBER"),
    ("error_rate>2", "fraction"),
    ("ttft_p95>2*base", "METRIC OP NUMBER"),
])
def test_bad_conditions_name_the_flag_and_the_fix(text, says):
    with pytest.raises(R.CanaryError) as e:
        R.parse_condition(text)
    assert "--abort-if" in str(e.value) and says in str(e.value)


def test_parse_guard_reports_every_bad_flag_at_once():
    with pytest.raises(R.CanaryError) as e:
        R.parse_guard(["nope>1"], "5 minutes", "-3m")
    msg = str(e.value)
    assert "--abort-if 'nope>1'" in msg and "--window '5 minutes'" in msg and "--promote-after '-3m'" in msg


def test_durations():
    assert R.parse_duration("5m", "--window") == 300 and R.parse_duration("1h", "--window") == 3600
    assert R.parse_duration("20s", "--window") == 20 and R.parse_duration("250ms", "--window") == 0.25
    g = R.parse_guard(["error_rate>0.02"], None, "30m")
    assert g.window_s == 300 and g.promote_after_s == 1800
    assert R.Guard.from_dict(g.to_dict()) == g


def test_transitions():
    g = R.Guard()
    s = R.start(None, "bot", "production", holder=1, version=2, weight=10, guard=g, now=100.0)
    assert (s.version, s.baseline, s.weight) == (2, 1, 10)
    assert R.CanaryState.from_dict(s.to_dict()) == s
    assert R.set_weight(s, "bot", "production", 50).weight == 50
    assert R.complete(s, "bot", "production", 2) is s
    with pytest.raises(R.CanaryError, match="already has a canary of version 2"):
        R.start(s, "bot", "production", 1, 3, 10, g, 0)
    with pytest.raises(R.CanaryError, match="already held by version 1"):
        R.start(None, "bot", "production", 1, 1, 10, g, 0)
    with pytest.raises(R.CanaryError, match="no holder"):
        R.start(None, "bot", "production", None, 2, 10, g, 0)
    with pytest.raises(R.CanaryError, match="--canary 100"):
        R.start(None, "bot", "production", 1, 2, 100, g, 0)
    with pytest.raises(R.CanaryError, match="--weight 0"):
        R.set_weight(s, "bot", "production", 0)
    with pytest.raises(R.CanaryError, match="has no canary; start one"):
        R.set_weight(None, "bot", "production", 20)
    with pytest.raises(R.CanaryError, match="complete it with --version 2"):
        R.complete(s, "bot", "production", 3)


def test_guard_verdicts():
    g = R.parse_guard(["error_rate>0.02", "ttft_p95>2*baseline"], "1m", None)
    base = R.summarize(100, 0, [0.1] * 100)
    assert R.violations(g, R.summarize(100, 1, [0.15] * 100), base) == []
    why = R.violations(g, R.summarize(100, 10, [0.15] * 100), base)
    assert len(why) == 1 and why[0].startswith("error_rate>0.02: candidate error_rate=0.1")
    why = R.violations(g, R.summarize(100, 0, [0.5] * 100), base)
    assert len(why) == 1 and "ttft_p95>2*baseline" in why[0] and "baseline 0.1" in why[0]
    # too few candidate requests: no verdict yet; no baseline: relative conditions wait
    assert R.violations(g, R.summarize(R.MIN_GUARD_REQUESTS - 1, 4, []), base) == []
    assert R.violations(g, R.summarize(50, 0, [9.0] * 50), R.summarize(0, 0, [])) == []


def test_promote_after():
    s = R.start(None, "bot", "p", 1, 2, 10, R.parse_guard([], None, "30s"), now=1000.0)
    assert not R.due_for_promotion(s, 1029.0) and R.due_for_promotion(s, 1030.0)
    assert not R.due_for_promotion(R.start(None, "bot", "p", 1, 2, 10, R.Guard(), 0), 1e9)


def test_percentile_nearest_rank():
    assert R.percentile([], 95) is None
    assert R.percentile(list(range(1, 101)), 95) == 95 and R.percentile(list(range(1, 101)), 50) == 50
