"""The serving side of a canary: per-request choice of version, answered names, per-version stats, guard actions."""

from __future__ import annotations

from llmplatform.registry import canary_rules as R
from llmplatform.serving import canary as C
from llmplatform.serving.adapters import Target


def split_target(weight: float, guard: R.Guard | None = None) -> Target:
    state = R.CanaryState("production", 2, 1, weight, 0.0, guard or R.Guard())
    cand = Target("models:/bot@production", "bot/2", "/a/v2", 2)
    return Target("bot@production", "bot/1", "/a/v1", 1, "bot@production", C.Split(cand, state))


def test_choose_is_sticky_by_user_and_keeps_the_requested_name():
    t = split_target(50)
    picks = {u: C.choose(t, u) for u in (f"user{i}" for i in range(400))}
    versions = {p.version for p in picks.values()}
    assert versions == {1, 2}
    assert all(C.choose(t, u).version == p.version for u, p in picks.items())
    assert all(p.model == "bot@production" and p.served_as == "bot@production" and p.split is None for p in picks.values())
    assert C.answered_as(picks["user1"], "bot@production") == f"bot/{picks['user1'].version}"
    assert C.answered_as(Target("tiny", served_as="tiny"), "tiny") == "tiny"  # the base names itself


def test_stats_window_and_report():
    now = [1000.0]
    stats = C.VersionStats(clock=lambda: now[0])
    for i in range(10):
        stats.record("bot/2", ok=i != 0, ttft_s=0.1 * (i + 1), tokens=4)
    now[0] += 120
    stats.record("bot/2", ok=True, ttft_s=0.05, tokens=4)
    w = stats.window("bot/2", 60)
    assert w["requests"] == 1 and w["errors"] == 0
    rep = stats.report(600)["bot/2"]
    assert (rep["requests"], rep["errors"], rep["tokens"]) == (11, 1, 44) and rep["ttft_p95_s"] == 1.0


def test_guard_aborts_on_errors_of_the_candidate_only_since_the_start():
    now = [1000.0]
    stats = C.VersionStats(clock=lambda: now[0])
    guard = R.parse_guard(["error_rate>0.02"], "1m", "10m")
    state = R.CanaryState("production", 2, 1, 10, 1000.0, guard)
    for _ in range(20):
        stats.record("bot/1", ok=False)  # the baseline's errors don't count against the candidate
        stats.record("bot/2", ok=True, ttft_s=0.1)
    assert C.guard_actions("bot", state, stats, now[0]) is None
    for _ in range(3):
        stats.record("bot/2", ok=False)
    kind, why = C.guard_actions("bot", state, stats, now[0])
    assert kind == "abort" and why.startswith("guard: error_rate>0.02: candidate error_rate=0.13")
    healthy = C.VersionStats(clock=lambda: now[0])
    healthy.record("bot/2", ok=True)
    assert C.guard_actions("bot", state, healthy, 1000.0 + 600)[0] == "complete"


def test_serve_status_version_rows_show_weights_and_numbers():
    from llmplatform.cli.serve import version_rows

    status = {"name": "tiny-chat", "canaries": {"models:/bot@production": {"version": 2, "baseline": 1, "weight": 10}},
              "versions": {"bot/1": {"requests": 90, "errors": 0, "tokens": 90, "ttft_p50_s": 0.05, "ttft_p95_s": 0.1},
                           "bot/2": {"requests": 10, "errors": 1, "tokens": 9, "ttft_p50_s": 0.06, "ttft_p95_s": None}}}
    rows = {r["version"]: r for r in version_rows(status)}
    assert rows["bot/1"]["weight"] == "90%" and rows["bot/2"]["weight"] == "10%"
    assert (rows["bot/2"]["requests"], rows["bot/2"]["errors"], rows["bot/2"]["ttft_p95_s"]) == (10, 1, None)


class _Resolved:
    def __init__(self, name, version):
        self.name, self.version, self.local_path = name, version, f"/adapters/{name}/v{version}"


def test_adapter_table_follows_the_canary_with_the_alias():
    from llmplatform.serving.adapters import AdapterTable
    from llmplatform.specs import parse_spec

    holder, canary = [1], [None]

    def resolve(ref):
        return _Resolved("bot", holder[0]) if ref == "models:/bot@production" else _Resolved("bot", int(ref.rsplit("/", 1)[1]))

    spec = parse_spec("serve", {"name": "dep", "model": {"base": "llama2-tiny", "registry": "models:/bot@production"},
                                "registry_poll_s": 60})
    misfits = {"/adapters/bot/v9"}
    t = AdapterTable(spec, "llama2-tiny", "/base", resolver=resolve, check=lambda p, b: ["rank"] if p in misfits else [],
                     canary_reader=lambda name, alias: canary[0])
    assert t.lookup("dep").split is None
    canary[0] = R.CanaryState("production", 2, 1, 10, 0.0)
    t.refresh()
    got = t.lookup("dep")
    assert got.version == 1 and got.split.target.adapter_id == "bot/2" and got.split.state.weight == 10
    canary[0] = R.CanaryState("production", 2, 1, 50, 0.0)
    t.refresh()
    assert t.lookup("dep").split.state.weight == 50 and list(t.canaries()) == ["models:/bot@production"]
    holder[0] = 2  # completed: the alias moved first; the stale state (baseline 1) is ignored at once
    t.refresh()
    got = t.lookup("dep")
    assert got.version == 2 and got.split is None
    canary[0] = R.CanaryState("production", 9, 2, 10, 0.0)  # a candidate that does not fit the base
    t.refresh()
    assert t.lookup("dep").split is None and "canary bot version 9 does not fit" in t.refused()["models:/bot@production"][9]


def test_which_errors_count_against_a_version():
    assert C.version_failed(500, "engine_error") and C.version_failed(503, "replica_unavailable")
    assert C.version_failed(400, "engine_error")  # its adapter can't be loaded
    assert not C.version_failed(400, "context_length_exceeded") and not C.version_failed(429, "queue_full")
