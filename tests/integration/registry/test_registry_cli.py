"""`platformctl models` end to end: list, show, promote (incl. refusals), rollback, tracking URI errors."""

from __future__ import annotations

import json

import pytest

from llmplatform.cli.main import main

pytestmark = pytest.mark.integration


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_commands(reg, capsys, monkeypatch):
    v1, v2 = reg.register(eval_loss=1.0, eval_accuracy=0.5), reg.register(eval_loss=1.4, eval_accuracy=0.4)
    uri = ["--tracking-uri", reg.uri]

    code, out, _ = run_cli(capsys, "models", "promote", reg.name, "--version", str(v1), "--to", "production",
                           "--require", "eval_loss<=1.2", "--reason", "launch", *uri)
    assert code == 0 and f"{reg.name}@production: (unset) -> v{v1}" in out and "eval_loss=1" in out

    code, out, err = run_cli(capsys, "models", "promote", reg.name, "--version", str(v2), "--to", "production",
                             "--no-worse-than", "production", *uri)
    assert code == 1 and "eval_loss=1.4" in err and "eval_loss=1" in err and "unchanged" in err and out == ""

    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.uri)  # the env fallback from here on
    code, out, _ = run_cli(capsys, "models", "list", "--output", "json")
    [row] = [r for r in json.loads(out) if r["name"] == reg.name]
    assert (row["versions"], row["aliases"], row["base_model"]) == (2, {"production": v1}, str(reg.tiny["base"]))
    assert row["metrics"] == {"eval_accuracy": 0.4, "eval_loss": 1.4}  # the latest version's eval metrics
    code, out, _ = run_cli(capsys, "models", "list", "--name", reg.name)
    assert code == 0 and reg.name in out and f"production=v{v1}" in out

    code, out, _ = run_cli(capsys, "models", "show", reg.name, "--version", str(v1))
    assert code == 0
    for expected in (f"/#/experiments/{reg.experiment_id}/runs/", "d" * 64, "r=8 alpha=16", "q_proj,v_proj",
                     "0123abc", '"kind": "FineTune"', "launch", "aliases: production"):
        assert expected in out, expected

    run_cli(capsys, "models", "promote", reg.name, "-v", str(v2), "--to", "production", "--actor", "ops")
    code, out, _ = run_cli(capsys, "models", "rollback", reg.name, "--alias", "production", "-o", "json")
    record = json.loads(out)
    assert code == 0 and (record["kind"], record["from_version"], record["to_version"]) == ("rollback", v2, v1)
    code, out, _ = run_cli(capsys, "models", "show", reg.name, "-o", "json")
    shown = json.loads(out)
    assert [(h["kind"], h["actor"]) for h in shown["history"]] == [("promote", "tester"), ("promote", "ops"), ("rollback", "tester")]
    assert shown["version"]["adapter"]["target_modules"] == ["q_proj", "v_proj"] and shown["aliases"] == {"production": v1}

    code, _, err = run_cli(capsys, "models", "rollback", reg.name, "--alias", "production")
    assert code == 1 and "no earlier version" in err
    code, _, err = run_cli(capsys, "models", "show", "no-such-model")
    assert code == 1 and "no registered model named 'no-such-model'" in err and reg.name in err


def test_no_tracking_server_says_how_to_get_one(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PLATFORM_HOME", str(tmp_path))
    code, _, err = run_cli(capsys, "models", "list")
    assert code == 1 and "platformctl up" in err and "MLFLOW_TRACKING_URI" in err
