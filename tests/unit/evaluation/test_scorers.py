"""The scorer registry: what each built-in scorer counts as right, and the errors a spec author sees."""

from __future__ import annotations

import pytest

from llmplatform.evaluation import scorers
from llmplatform.training.evaluate import exact_match as strict_exact_match


@pytest.mark.parametrize("prediction,reference,expected", [
    ("Paris", "paris", 1.0),
    ("  Paris.  ", "Paris", 1.0),
    ("The answer:\n\n 42!", "the answer: 42", 1.0),
    ("Paris, France", "Paris", 0.0),
    ("", "", 1.0),
])
def test_exact_match_ignores_case_whitespace_and_surrounding_punctuation(prediction, reference, expected):
    assert scorers.exact_match(prediction, reference) == expected


def test_exact_match_can_be_strict_and_the_training_helper_is_its_strict_form():
    assert scorers.exact_match("Paris.", "paris", ignore_case=False, ignore_punctuation=False) == 0.0
    assert strict_exact_match("a  b ", "a b") and not strict_exact_match("A b", "a b")


def test_contains_and_token_f1():
    assert scorers.contains("I think it is Paris, France.", "paris") == 1.0
    assert scorers.contains("Lyon", "Paris") == 0.0
    assert scorers.contains("anything", "") == 0.0  # an empty reference proves nothing
    assert scorers.token_f1("the cat sat", "the cat sat") == 1.0
    assert scorers.token_f1("the cat", "the cat sat on") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert scorers.token_f1("dog", "cat") == 0.0
    assert scorers.token_f1("Cat.", "cat") == 1.0


def test_regex_and_json_valid():
    assert scorers.regex("answer: 42", "", pattern=r"\d+") == 1.0
    assert scorers.regex("answer: 42", "", pattern=r"\d+", full=True) == 0.0
    assert scorers.json_valid(' {"a": [1, 2]} ', "") == 1.0
    assert scorers.json_valid("{a: 1}", "") == 0.0


def test_unknown_scorer_names_the_known_ones():
    with pytest.raises(scorers.ScorerError) as err:
        scorers.check_name("exactmatch")
    assert "unknown scorer 'exactmatch'" in str(err.value)
    for name in ("exact_match", "contains", "token_f1", "regex", "json_valid", "python:package.module:function"):
        assert name in str(err.value)
    with pytest.raises(scorers.ScorerError, match="not an import path"):
        scorers.check_name("python:mymod.score")


def test_params_are_checked_against_the_scorer():
    scorers.check_params("regex", {"pattern": "a+"})
    with pytest.raises(scorers.ScorerError, match=r"missing \['pattern'\]"):
        scorers.check_params("regex", {})
    with pytest.raises(scorers.ScorerError, match=r"unknown parameter\(s\) \['patern'\]"):
        scorers.check_params("regex", {"pattern": "a", "patern": "b"})
    with pytest.raises(scorers.ScorerError, match="not a valid regular expression"):
        scorers.check_params("regex", {"pattern": "(unclosed"})
    with pytest.raises(scorers.ScorerError, match="accepted: none"):
        scorers.check_params("token_f1", {"k": 1})


def test_user_scorer_is_loaded_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text("def starts_same(p, r):\n    return p[:1] == r[:1]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = scorers.load("python:my_scorers:starts_same")
    assert scorers.score(fn, "abc", "axe", {}) == 1.0
    with pytest.raises(scorers.ScorerError, match="cannot be imported"):
        scorers.load("python:my_scorers:missing")
    with pytest.raises(TypeError, match="expected a number"):
        scorers.score(lambda p, r: "yes", "a", "b", {})


def test_perplexity_is_a_model_scorer_without_params():
    scorers.check_name("perplexity")
    assert scorers.load("perplexity") is None  # the runner computes it with a forward pass
    assert "perplexity" in scorers.known_scorers()
    with pytest.raises(scorers.ScorerError, match="accepted: none"):
        scorers.check_params("perplexity", {"stride": 4})
