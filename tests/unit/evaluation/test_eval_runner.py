"""The runner's pure parts: which models are registered references, raising scorers counted, missing references."""

from __future__ import annotations

import json

import pytest

from llmplatform import specs
from llmplatform.errors import DataError
from llmplatform.evaluation import scorers
from llmplatform.evaluation.runner import (EvalReport, Example, ModelResult, ModelTarget, load_examples, parse_model,
                                           score_examples)


def test_parse_model_tells_registered_references_from_base_models(tmp_path):
    assert parse_model("bot@production") == ("bot", "production", None)
    assert parse_model("models:/bot/3") == ("bot", None, 3)
    assert parse_model("llama2-tiny") == ("llama2-tiny", None, None)
    assert parse_model("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", None, None)
    (tmp_path / "ckpt" / "7").mkdir(parents=True)
    local = str(tmp_path / "ckpt" / "7")
    assert parse_model(local) == (local, None, None)  # an existing directory is a base model


def _spec(path, metrics=("exact_match",)):
    return specs.parse_spec("eval", {"name": "e", "models": ["llama2-tiny"], "metrics": list(metrics),
                                     "dataset": {"name": "d", "path": str(path)}})


def test_a_raising_scorer_is_counted_and_the_mean_is_over_the_examples_that_scored():
    spec = _spec("x.jsonl", ["exact_match", "python:os.path:join"])
    examples = [Example(i, f"line {i + 1}", "q", "ref", []) for i in range(3)]
    def fragile(prediction, reference):
        return 1 / (prediction != "boom")

    fns = {"exact_match": scorers.exact_match, "python:os.path:join": fragile}
    scores, failures = score_examples(examples, ["ref", "boom", "c"], spec.metrics, fns, "bot/2")
    assert scores == {"exact_match": [1.0, 0.0, 0.0], "join": [1.0, None, 1.0]}  # the other metric is untouched
    assert [(f.metric, f.index, f.location, f.model) for f in failures] == [("join", 1, "line 2", "bot/2")]
    assert "raised on example 1 (line 2) of model 'bot/2': ZeroDivisionError" in failures[0].describe()

    result = ModelResult(ModelTarget("bot/2", "llama2-tiny", registered="bot", version=2), ["ref", "boom", "c"],
                         scores, failures)
    assert result.means() == {"exact_match": pytest.approx(1 / 3), "join": 1.0}  # 2 of 3 scored, both 1.0
    assert result.errors() == {"exact_match": 0, "join": 1} and result.error() is None
    row = EvalReport("e", "d", 3, [result]).rows()[0]
    assert row["join"] == 1.0 and row["scored"]["join"] == 2 and row["errors"]["join"] == 1
    assert row["failures"][0]["index"] == 1 and "ZeroDivisionError" in row["failures"][0]["error"]


def test_a_metric_that_raised_on_every_example_fails_that_model_only():
    spec = _spec("x.jsonl", ["exact_match", "python:os.path:join"])
    examples = [Example(i, f"line {i + 1}", "q", "ref", []) for i in range(2)]
    def broken(prediction, reference):
        raise KeyError("label")

    fns = {"exact_match": scorers.exact_match, "python:os.path:join": broken}
    scores, failures = score_examples(examples, ["ref", "x"], spec.metrics, fns, "bot/2")
    bad = ModelResult(ModelTarget("bot/2", "llama2-tiny"), ["ref", "x"], scores, failures)
    good = ModelResult(ModelTarget("llama2-tiny", "llama2-tiny"), ["ref", "x"], {"exact_match": [1.0, 0.0], "join": [1.0, 1.0]})
    report = EvalReport("e", "d", 2, [good, bad])
    assert "join" not in bad.means() and report.rows()[1]["join"] is None
    assert report.failed() == ["model 'bot/2': metric 'join' raised on all 2 examples (first: line 1: KeyError: 'label'); "
                               "nothing was tagged for it"]
    assert report.rows()[0]["error"] is None


def test_records_without_a_reference_are_refused_with_their_lines(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "  "}]},
            {"messages": [{"role": "user", "content": "q3"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(_spec(path), tokenizer=None)  # refused before any tokenizer or model is used
    text = str(err.value)
    assert "line 2: messages[1]: empty assistant turn" in text and "line 3" in text and "line 1" not in text


def test_text_records_are_refused_for_evaluation_with_their_lines(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"text": "a document"}) + "\n" + json.dumps({"text": "another"}) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(_spec(path), tokenizer=None)
    assert [p.location for p in err.value.problems] == ["line 1", "line 2"]
    assert "no answer to score" in str(err.value)
