"""CLI output for people: rich tables and live progress on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from types import SimpleNamespace


from llmplatform.cli.output import LiveLines, OutputFormat, StepBar, deploy_progress, emit, replica_summary
from llmplatform.serving.app import deploy_snapshot

ROWS = [{"name": "chat", "status": "RUNNING", "replicas": 2}, {"name": "tiny", "status": "DEPLOYING", "replicas": None}]


def serve_status(app_state: str, **replicas: dict) -> SimpleNamespace:
    """The shape of Ray Serve's ApplicationStatusOverview (enum members print as Enum.NAME)."""
    deps = {name: SimpleNamespace(status=f"DeploymentStatus.{status}", replica_states={f"ReplicaState.{k}": v for k, v in states.items()})
            for name, (status, states) in replicas.items()}
    return SimpleNamespace(status=f"ApplicationStatus.{app_state}", deployments=deps)


def test_deploy_snapshot_names_each_deployments_replica_states():
    snap = deploy_snapshot(serve_status("DEPLOYING", LLMServer=("UPDATING", {"STARTING": 1, "RUNNING": 0}),
                                        Ingress=("HEALTHY", {"RUNNING": 1})), 12.0)
    assert snap["state"] == "DEPLOYING" and snap["deployments"]["LLMServer"]["replicas"] == {"STARTING": 1, "RUNNING": 0}
    assert replica_summary(snap) == "DEPLOYING  Ingress HEALTHY (RUNNING 1)  LLMServer UPDATING (STARTING 1)"
    assert replica_summary(deploy_snapshot(None, 0.5)) == "PENDING"


def test_deploy_progress_off_a_terminal_prints_a_line_per_change(capsys):
    lines, progress = deploy_progress("deploying chat", OutputFormat.table)
    with lines:
        for snap in (deploy_snapshot(None, 0), deploy_snapshot(serve_status("DEPLOYING", S=("UPDATING", {"STARTING": 1})), 3),
                     deploy_snapshot(serve_status("DEPLOYING", S=("UPDATING", {"STARTING": 1})), 3)):
            progress(snap)
    err = capsys.readouterr().err.splitlines()
    assert err == ["deploying chat: PENDING  (0s)", "deploying chat: DEPLOYING  S UPDATING (STARTING 1)  (3s)"]


def test_json_output_gets_no_progress(capsys):
    lines, progress = deploy_progress("deploying chat", OutputFormat.json)
    with lines:
        progress(deploy_snapshot(None, 0))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_live_lines_on_a_terminal_leave_the_last_state(capsys):
    with LiveLines("deploying chat", terminal=True) as lines:
        lines.update("DEPLOYING  S UPDATING (STARTING 1)")
        lines.update("RUNNING  S HEALTHY (RUNNING 1)")
    err = capsys.readouterr().err
    assert "deploying chat: RUNNING  S HEALTHY (RUNNING 1)" in err


def test_step_bar_plain_and_rich(capsys):
    bar = StepBar("job ft-1", terminal=False)
    bar.update(1, 4, "running", "[#.] 1/4  running")
    bar.update(1, 4, "running", "[#.] 1/4  running")
    bar.update(4, 4, "succeeded", "[##] 4/4  succeeded")
    bar.close()
    assert capsys.readouterr().out.splitlines() == ["[#.] 1/4  running", "[##] 4/4  succeeded"]
    bar = StepBar("job ft-1", terminal=True)
    bar.update(3, 4, "running  loss 1.2000", "unused")
    bar.close()
    out = capsys.readouterr().out
    assert "job ft-1" in out and "3/4" in out and "loss 1.2000" in out


def test_tables_are_plain_off_a_terminal_and_rich_on_one(capsys, monkeypatch):
    emit(ROWS, OutputFormat.table, columns=["name", "status", "replicas"])
    plain = capsys.readouterr().out.splitlines()
    assert plain[0].split() == ["NAME", "STATUS", "REPLICAS"] and plain[2].split() == ["tiny", "DEPLOYING", "-"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    emit(ROWS, OutputFormat.table, columns=["name", "status", "replicas"])
    rich_out = capsys.readouterr().out
    assert "NAME" in rich_out and "chat" in rich_out and "RUNNING" in rich_out and "-" in rich_out


def test_json_shape_is_unchanged_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    emit(ROWS, OutputFormat.json, columns=["name"])
    import json

    assert json.loads(capsys.readouterr().out) == ROWS
