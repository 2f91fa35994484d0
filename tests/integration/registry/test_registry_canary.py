"""`platformctl models` canary steps against the real MLflow server: start, raise, complete, abort,
the history they leave, `models show`, and flag errors that name the flag."""

from __future__ import annotations

import json

import pytest

from llmplatform.cli.main import main

pytestmark = pytest.mark.integration


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_canary_start_raise_complete_then_rollback_walks_back(reg, capsys):
    from llmplatform.registry import canary, rollback

    v1, v2 = reg.register(eval_loss=1.0), reg.register(eval_loss=0.9)
    uri = ["--tracking-uri", reg.uri]
    assert cli(capsys, "models", "promote", reg.name, "--version", str(v1), "--to", "production", *uri)[0] == 0
    code, out, err = cli(capsys, "models", "promote", reg.name, "--version", str(v2), "--to", "production", "--canary", "10",
                         "--abort-if", "error_rate>0.02", "--abort-if", "ttft_p95>2*baseline", "--window", "5m",
                         "--promote-after", "30m", *uri)
    assert code == 0, err
    assert f"canary-start v{v2} at 10% (rest on v{v1})" in out
    state = canary.state_of(reg.uri, reg.name, "production")
    assert (state.version, state.baseline, state.weight, state.guard.window_s, state.guard.promote_after_s) == (v2, v1, 10, 300, 1800)
    assert reg.client.get_registered_model(reg.name).aliases["production"] == str(v1)  # the alias has not moved

    code, out, err = cli(capsys, "models", "promote", reg.name, "--version", str(v2), "--to", "production", "--canary", "20", *uri)
    assert code == 1 and "already has a canary" in err
    assert cli(capsys, "models", "canary", reg.name, "--alias", "production", "--weight", "50", *uri)[0] == 0
    assert canary.state_of(reg.uri, reg.name, "production").weight == 50

    code, out, _ = cli(capsys, "models", "show", reg.name, "--output", "json", *uri)
    shown = json.loads(out)
    assert shown["canaries"]["production"]["weight"] == 50
    code, out, _ = cli(capsys, "models", "show", reg.name, *uri)
    assert f"canary on production: v{v2} at 50%, v{v1} at 50%" in out and "error_rate>0.02 and ttft_p95>2*baseline" in out

    code, out, err = cli(capsys, "models", "promote", reg.name, "--version", str(v1), "--to", "production", "--complete", *uri)
    assert code == 1 and f"complete it with --version {v2}" in err
    code, out, err = cli(capsys, "models", "promote", reg.name, "--version", str(v2), "--to", "production", "--complete", *uri)
    assert code == 0 and f"v{v1} -> v{v2}" in out
    assert canary.state_of(reg.uri, reg.name, "production") is None
    kinds = [e["kind"] for e in json.loads(cli(capsys, "models", "show", reg.name, "--output", "json", *uri)[1])["history"]]
    assert kinds == ["promote", "canary-start", "canary-weight", "promote"]
    assert rollback(reg.uri, reg.name, "production").to_version == v1  # canary steps are not rollback targets


def test_rollback_aborts_a_running_canary_and_records_why(reg, capsys):
    from llmplatform.registry import canary

    v1, v2 = reg.register(eval_loss=1.0), reg.register(eval_loss=0.9)
    uri = ["--tracking-uri", reg.uri]
    cli(capsys, "models", "promote", reg.name, "--version", str(v1), "--to", "production", *uri)
    canary.start(reg.uri, reg.name, v2, "production", 10)
    code, out, err = cli(capsys, "models", "rollback", reg.name, "--alias", "production", "--reason", "looks off", *uri)
    assert code == 0 and "canary-abort" in out and "looks off" in out
    assert canary.state_of(reg.uri, reg.name, "production") is None
    assert reg.client.get_registered_model(reg.name).aliases["production"] == str(v1)
    last = json.loads(cli(capsys, "models", "show", reg.name, "--output", "json", *uri)[1])["history"][-1]
    assert (last["kind"], last["from_version"], last["to_version"], last["reason"]) == ("canary-abort", v2, v1, "looks off")
    assert canary.abort(reg.uri, reg.name, "production", missing_ok=True) is None


def test_canary_flag_errors_name_the_flag(reg, capsys):
    v1, v2 = reg.register(eval_loss=1.0), reg.register(eval_loss=0.9)
    uri = ["--tracking-uri", reg.uri]
    code, _, err = cli(capsys, "models", "promote", reg.name, "--version", str(v2), "--to", "production", "--canary", "10", *uri)
    assert code == 1 and "no holder" in err
    cli(capsys, "models", "promote", reg.name, "--version", str(v1), "--to", "production", *uri)
    code, _, err = cli(capsys, "models", "promote", reg.name, "--version", str(v2), "--to", "production", "--canary", "10",
                       "--abort-if", "p99>3", "--window", "soon", *uri)
    assert code == 1 and "--abort-if 'p99>3'" in err and "--window 'soon'" in err
    code, _, err = cli(capsys, "models", "promote", reg.name, "--version", str(v2), "--to", "production", "--window", "5m", *uri)
    assert code == 1 and "add --canary" in err
    code, _, err = cli(capsys, "models", "canary", reg.name, "--alias", "production", "--weight", "30", *uri)
    assert code == 1 and "has no canary; start one" in err
