"""The runner's pure parts: which models are registered references, scoring errors, missing references."""

from __future__ import annotations

import json

import pytest

from llmplatform import specs
from llmplatform.errors import DataError, EvalError
from llmplatform.evaluation import scorers
from llmplatform.evaluation.runner import Example, load_examples, parse_model, score_examples


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


def test_a_raising_scorer_names_the_example_and_model():
    spec = _spec("x.jsonl", ["exact_match", "python:os.path:join"])
    examples = [Example(i, f"line {i + 1}", "q", "ref", []) for i in range(3)]
    def fragile(prediction, reference):
        return 1 / (prediction != "boom")

    fns = {"exact_match": scorers.exact_match, "python:os.path:join": fragile}
    with pytest.raises(EvalError) as err:
        score_examples(examples, ["a", "boom", "c"], spec.metrics, fns, "bot/2")
    text = str(err.value)
    assert "failed on example 1 (line 2) of model 'bot/2'" in text and "ZeroDivisionError" in text


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
