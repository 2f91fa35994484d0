"""The eval spec: models, dataset, metrics; unknown scorers and bad parameters are refused with the field."""

from __future__ import annotations

import textwrap

import pytest

from llmplatform import specs
from llmplatform.cli.main import main
from llmplatform.errors import SpecError


def _spec(**over):
    return {"name": "rev-eval", "models": ["llama2-tiny", "bot@production", "bot/3"],
            "dataset": {"name": "reverse", "path": "eval.jsonl"}, **over}


def test_bare_scorer_names_and_params_make_metrics():
    spec = specs.parse_spec("eval", _spec(metrics=["exact_match", {"scorer": "regex", "name": "digits",
                                                                  "params": {"pattern": r"^\d+$"}},
                                                   "python:my.mod:score_fn"]))
    assert [m.metric for m in spec.metrics] == ["exact_match", "digits", "score_fn"]
    assert spec.generation.batch_size == 16 and spec.mlflow.experiment


def test_unknown_scorer_is_refused_with_the_field_and_the_known_scorers():
    with pytest.raises(SpecError) as err:
        specs.parse_spec("eval", _spec(metrics=["exact_match", "bleu", {"scorer": "regex"}]), "e.yaml")
    text = str(err.value)
    assert "metrics.1.scorer: unknown scorer 'bleu'" in text
    assert "exact_match, contains, token_f1, regex, json_valid" in text
    assert "metrics.2: scorer 'regex': missing ['pattern']" in text  # reported together


def test_dataset_name_cannot_break_the_tag_and_metric_names_are_unique():
    with pytest.raises(SpecError) as err:
        specs.parse_spec("eval", _spec(dataset={"name": "a.b", "path": "x"}))
    assert [p.location for p in err.value.problems] == ["dataset.name"]
    with pytest.raises(SpecError, match=r"repeated: \['token_f1'\] \(give each a `name`\)"):
        specs.parse_spec("eval", _spec(metrics=["token_f1", "token_f1"]))
    with pytest.raises(SpecError, match=r"models must be unique; repeated: \['bot/3'\]"):
        specs.parse_spec("eval", _spec(models=["bot/3", "bot/3"]))


def test_spec_validate_guesses_the_eval_kind(tmp_path, capsys):
    path = tmp_path / "eval.yaml"
    path.write_text(textwrap.dedent("""
        name: rev-eval
        models: [llama2-tiny]
        dataset: {name: reverse, path: eval.jsonl}
        metrics: [exact_match, contains]
    """))
    assert main(["spec", "validate", str(path)]) == 0
    assert "valid eval spec 'rev-eval'" in capsys.readouterr().out
