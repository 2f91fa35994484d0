"""Job records, progress parsing and the `finetune` CLI paths that need no cluster:
bad data is refused before anything is submitted, unknown ids and missing stacks say what to do."""

import json
import shlex

import pytest

from llmplatform.backends import records
from llmplatform.backends.base import JobRecord
from llmplatform.backends.ray_jobs import apply_events, entrypoint_command, parse_events
from llmplatform.cli.main import main
from llmplatform.errors import JobError
from llmplatform.training.entrypoint import plain_reason


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def test_progress_events_fold_into_the_record():
    log = "\n".join([
        'PLATFORM_PROGRESS {"kind": "run", "run_id": "r1", "url": "http://m/#/r1"}',
        '\x1b[36m(RayTrainWorker pid=11)\x1b[0m PLATFORM_PROGRESS {"kind": "worker_start", "rank": 0, "pid": 11, "step": 0, "total": 9, "resumed": false}',
        '(RayTrainWorker pid=11) PLATFORM_PROGRESS {"kind": "step", "step": 3, "total": 9, "loss": 1.5, "eval_loss": 1.7}',
        '(RayTrainWorker pid=11) PLATFORM_PROGRESS {"kind": "checkpoint", "step": 3}',
        '(RayTrainWorker pid=11) PLATFORM_PROGRESS {"kind": "checkpoint", "step": 3}',
        'noise PLATFORM_PROGRESS {broken',
        '(RayTrainWorker pid=12) PLATFORM_PROGRESS {"kind": "worker_start", "rank": 0, "pid": 12, "step": 3, "total": 9, "resumed": true}',
        '(RayTrainWorker pid=12) PLATFORM_PROGRESS {"kind": "step", "step": 4, "total": 9, "loss": 1.2}',
        'PLATFORM_PROGRESS {"kind": "result", "version": "2", "registered_model": "m"}',
    ])
    rec = apply_events(JobRecord(id="j", name="n", target="local"), parse_events(log))
    assert (rec.run_id, rec.step, rec.total, rec.checkpoint_step, rec.restarts) == ("r1", 4, 9, 3, 1)
    assert rec.metrics["loss"] == 1.2 and rec.eval_metrics["eval_loss"] == 1.7
    assert rec.version == "2" and rec.progress == "4/9"


def test_after_a_restart_the_checkpoint_is_the_one_training_resumed_from():
    events = [{"kind": "worker_start", "rank": 0, "pid": 11, "step": 0, "total": 60, "resumed": False},
              {"kind": "step", "step": 25, "total": 60}, {"kind": "checkpoint", "step": 25},
              {"kind": "step", "step": 50, "total": 60}, {"kind": "checkpoint", "step": 50},  # reported, then the worker died
              {"kind": "worker_start", "rank": 0, "pid": 12, "step": 25, "total": 60, "resumed": True},
              {"kind": "step", "step": 26, "total": 60}]
    rec = apply_events(JobRecord(id="j", name="n", target="local"), events)
    assert (rec.checkpoint_step, rec.step, rec.restarts) == (25, 26, 1)
    later = apply_events(JobRecord(id="j", name="n", target="local"), [*events, {"kind": "checkpoint", "step": 50}])
    assert later.checkpoint_step == 50


def test_entrypoint_command_round_trips_the_resolved_plan(spec_for, capsys):
    from llmplatform.resolve import Resolved, resolve
    from llmplatform.training import entrypoint

    spec = spec_for(name="it-s-quoted", data={"system_prompt": "Don't \"panic\" $HOME `x`"})
    plan = resolve(spec)
    argv = shlex.split(entrypoint_command("py", plan, "job-1", "run-1", "http://m", "/base"))
    assert argv[:3] == ["py", "-m", "llmplatform.training.entrypoint"]
    parsed = Resolved.from_dict(json.loads(argv[argv.index("--resolved-json") + 1]))
    assert parsed.spec == spec and parsed.values == plan.values
    assert argv[argv.index("--base-dir") + 1] == "/base"
    assert entrypoint.main(["--resolved-json", "{}", "--job-id", "x"]) == 1  # not a plan -> clean error
    assert "not a resolved plan" in capsys.readouterr().err
    bare = json.dumps(spec.model_dump(mode="json"))  # a bare spec is not a plan: the job never plans for itself
    assert entrypoint.main(["--resolved-json", bare, "--job-id", "x"]) == 1


def test_records_round_trip_and_unknown_ids_are_explained(home):
    rec = records.save(JobRecord(id="a-1", name="a", target="local", state="running", step=2, total=5, metrics={"loss": 0.5}))
    assert records.load("a-1").to_dict() == rec.to_dict()
    assert [r.id for r in records.list_records()] == ["a-1"]
    with pytest.raises(Exception, match="no fine-tuning job 'nope'.*a-1"):
        records.load("nope")


def test_plain_reason_finds_the_worker_error():
    exc = RuntimeError("Training failed.\nTraceback ...\n  File x\nValueError: 3 training sequences are too few for 2 worker(s)\n")
    assert plain_reason(exc) == "ValueError: 3 training sequences are too few for 2 worker(s)"


def _spec_file(tmp_path, train, base):
    path = tmp_path / "job.yaml"
    path.write_text(f"name: bad\nbase_model: {base}\ndata:\n  train: {train}\n  max_seq_length: 64\n")
    return path


def test_submit_refuses_bad_data_before_anything_starts(home, tmp_path, tiny_random_dir, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                     "{not json\n"
                     '{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}\n')
    code = main(["finetune", "submit", str(_spec_file(tmp_path, train, tiny_random_dir)), "--target", "local"])
    err = capsys.readouterr().err
    assert code == 1
    assert "line 2" in err and "line 3" in err
    assert records.list_records() == []  # a refused submission is no job
    assert main(["finetune", "list", "--output", "json"]) == 0 and json.loads(capsys.readouterr().out) == []


def test_submit_without_a_running_stack_says_how_to_start_one(home, tmp_path, tiny_random_dir, task_files, capsys):
    code = main(["finetune", "submit", str(_spec_file(tmp_path, task_files["train"], tiny_random_dir))])
    assert code == 1 and "platformctl up" in capsys.readouterr().err
    assert records.list_records() == []  # nothing took the job: no record


def test_submit_rejects_an_invalid_spec_with_every_problem(home, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("name: Bad_Name\nbase_model: x\ndata: {train: t.jsonl}\nhyperparameters: {learning_rat: 1}\n")
    assert main(["finetune", "submit", str(path)]) == 1
    err = capsys.readouterr().err
    assert "name" in err and "learning_rat" in err and "did you mean 'learning_rate'" in err


def test_status_of_unknown_job_and_empty_list(home, capsys):
    assert main(["finetune", "status", "ghost"]) == 1
    assert "no fine-tuning job 'ghost'" in capsys.readouterr().err
    assert main(["finetune", "list", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_target_ray_needs_ray_address(home, tmp_path, tiny_random_dir, task_files, capsys):
    code = main(["finetune", "submit", str(_spec_file(tmp_path, task_files["train"], tiny_random_dir)), "--target", "ray"])
    assert code == 1 and "RAY_ADDRESS" in capsys.readouterr().err
    assert records.list_records() == []


def test_an_ended_job_shows_no_eta():
    from llmplatform.cli.finetune import progress_line

    metrics = {"loss": 0.5, "elapsed_s": 30.0, "start_step": 0}
    running = JobRecord(id="j", name="n", target="local", state="running", step=10, total=40, metrics=metrics)
    assert "ETA 1m30s" in progress_line(running)
    for state in ("cancelled", "failed", "succeeded"):
        ended = JobRecord(id="j", name="n", target="local", state=state, step=10, total=40, metrics=metrics)
        assert "ETA" not in progress_line(ended) and state in progress_line(ended)


def test_target_ray_takes_either_form_of_ray_address(monkeypatch):
    from llmplatform.backends.targets import backend_for

    for address in ("head.example:6379", "http://head.example:8265"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert backend_for("ray", "http://mlflow:5000").address == "http://head.example:8265"  # nothing connects yet
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    with pytest.raises(JobError, match="names no Ray Jobs API"):
        backend_for("ray")
