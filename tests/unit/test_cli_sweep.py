"""`finetune sweep`'s trial table: rows from the sweep job's log, and the plain (non-terminal) output."""

from __future__ import annotations

import json

from llmplatform.cli.output import LiveTable
from llmplatform.cli.sweep import sweep_result, trial_rows


def _line(**event) -> str:
    return "(pid=1) PLATFORM_PROGRESS " + json.dumps(event)


def test_trial_rows_keep_the_latest_state_of_each_trial():
    log = "\n".join([
        _line(kind="trial", trial=1, state="running", params={"lora.rank": 16}),
        _line(kind="step", step=3, total=12),
        _line(kind="trial", trial=0, state="running", step=4, eval_loss=3.1, params={"lora.rank": 8}),
        _line(kind="trial", trial=1, state="stopped", step=4, eval_loss=3.9),
        _line(kind="result", best_trial=0, best_params={"lora.rank": 8}, metric="eval_loss", value=2.5),
    ])
    rows = trial_rows(log)
    assert [(r["trial"], r["state"], r.get("step")) for r in rows] == [(0, "running", 4), (1, "stopped", 4)]
    assert rows[1]["params"] == {"lora.rank": 16}  # earlier fields survive a later event
    assert sweep_result(log)["best_trial"] == 0
    assert sweep_result(_line(kind="result", run_id="x")) is None  # a plain fine-tune's result is not a sweep's


def test_plain_table_prints_a_line_per_changed_trial(capsys):
    table = LiveTable("sweep s1", ["trial", "state", "eval_loss"], terminal=False)
    table.update([{"trial": 0, "state": "running"}])
    table.update([{"trial": 0, "state": "running"}, {"trial": 1, "state": "running"}])
    table.update([{"trial": 0, "state": "finished", "eval_loss": 2.5}, {"trial": 1, "state": "running"}])
    assert capsys.readouterr().err.splitlines() == [
        "sweep s1: trial=0  state=running  eval_loss=-",
        "sweep s1: trial=1  state=running  eval_loss=-",
        "sweep s1: trial=0  state=finished  eval_loss=2.5",
    ]
    quiet = LiveTable("sweep s1", ["trial"], enabled=False, terminal=False)
    quiet.update([{"trial": 0}])
    assert capsys.readouterr().err == ""
