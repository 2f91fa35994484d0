"""The Ray job's command line carries the whole spec (quoted for the shell) and ids are DNS-safe."""

from __future__ import annotations

import json
import re
import shlex

from llmplatform import specs
from llmplatform.evaluation.ray_job import entrypoint_command, new_eval_id


def test_the_job_command_round_trips_the_spec_through_the_shell():
    spec = specs.parse_spec("eval", {"name": "rev-eval", "models": ["llama2-tiny", "bot@production"],
                                     "dataset": {"name": "d", "path": "/data/it's here.jsonl"},
                                     "metrics": ["exact_match", {"scorer": "regex", "params": {"pattern": "^\\d+ $"}}]})
    argv = shlex.split(entrypoint_command("/venv/bin/python", spec, "http://127.0.0.1:5000"))
    assert argv[:3] == ["/venv/bin/python", "-m", "llmplatform.evaluation.entrypoint"]
    assert argv[argv.index("--tracking-uri") + 1] == "http://127.0.0.1:5000"
    assert specs.parse_spec("eval", json.loads(argv[argv.index("--spec-json") + 1])) == spec


def test_eval_job_ids_are_unique_and_dns_safe():
    spec = specs.parse_spec("eval", {"name": "a" * 63, "models": ["llama2-tiny"], "dataset": {"name": "d", "path": "x"}})
    ids = {new_eval_id(spec) for _ in range(20)}
    assert len(ids) > 1 and all(re.fullmatch(r"[a-z0-9-]{1,63}", i) for i in ids)


def test_the_entrypoint_without_a_tracking_server_says_which_to_set(monkeypatch, capsys):
    """An EvaluationJob's pod passes no --tracking-uri: it reads MLFLOW_TRACKING_URI (the platform Secret)."""
    from llmplatform.evaluation import entrypoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = {"name": "e", "models": ["llama2-tiny"], "dataset": {"name": "d", "path": "/nowhere.jsonl"}}
    assert entrypoint.main(["--spec-json", json.dumps(spec), "--job-id", "e-1234"]) == 1
    out = capsys.readouterr().out
    assert '"kind": "failed"' in out and "set MLFLOW_TRACKING_URI" in out
