"""Promotion gates: requirement parsing, the direction rule, and messages carrying both numbers."""

from __future__ import annotations

import pytest

from llmplatform.errors import RegistryError
from llmplatform.registry.gates import (check_no_worse, check_requirements, eval_tag_metrics, gate_metrics, lower_is_better,
                                        parse_requirements)


def test_parse_every_operator_and_report_all_bad_ones_at_once():
    reqs = parse_requirements(["eval_loss<=1.2", "eval/acc >= 0.9", "ppl<3e1", "x>-1", "n==2"])
    assert [(r.metric, r.op, r.threshold) for r in reqs] == [
        ("eval_loss", "<=", 1.2), ("eval/acc", ">=", 0.9), ("ppl", "<", 30.0), ("x", ">", -1.0), ("n", "==", 2.0)]
    with pytest.raises(RegistryError) as err:
        parse_requirements(["eval_loss=<1", "acc>=high", "ok<=1"])
    assert "'eval_loss=<1'" in str(err.value) and "'acc>=high'" in str(err.value) and "ok<=1" not in str(err.value)


def test_direction_rule():
    assert all(lower_is_better(m) for m in ("eval_loss", "perplexity", "eval_ppl", "error_rate", "p95_latency_ms"))
    assert not any(lower_is_better(m) for m in ("eval_accuracy", "exact_match", "bleu"))


def test_requirement_failure_names_the_value_and_the_limit():
    [ok, bad, missing] = check_requirements(parse_requirements(["eval_loss<=1.2", "eval_acc>=0.9", "bleu>1"]),
                                            {"eval_loss": 1.1, "eval_acc": 0.75}, version=3)
    assert ok.passed and not bad.passed and not missing.passed
    assert "eval_acc=0.75" in bad.message and ">= 0.9" in bad.message and "version 3" in bad.message
    assert "no metric 'bleu'" in missing.message and "eval_acc, eval_loss" in missing.message


def test_no_worse_than_uses_direction_and_reports_both_versions():
    cand, prod = {"eval_loss": 0.8, "eval_acc": 0.70}, {"eval_loss": 0.9, "eval_acc": 0.72}
    names = gate_metrics([], cand, prod)
    assert names == ["eval_acc", "eval_loss"]
    acc, loss = check_no_worse(names, cand, prod, version=5, alias="production", holder_version=4)
    assert loss.passed and not acc.passed
    assert "eval_acc=0.7" in acc.message and "eval_acc=0.72" in acc.message and "version 4" in acc.message
    assert "higher is better" in acc.message
    tie = check_no_worse(["eval_loss"], {"eval_loss": 1.0}, {"eval_loss": 1.0}, 2, "production", 1)
    assert tie[0].passed


def test_no_worse_than_needs_a_shared_metric():
    assert gate_metrics(parse_requirements(["eval_loss<2"]), {}, {}) == ["eval_loss"]
    [result] = check_no_worse([], {"train_loss": 1}, {"eval_loss": 1}, 2, "production", 1)
    assert not result.passed and "--require" in result.message


def test_eval_tags_are_gate_metrics_and_a_missing_one_names_the_command():
    tags = {"eval.reverse.exact_match": "0.95", "eval.reverse.run_id": "abc123", "llmplatform.lineage.x": "1"}
    metrics = eval_tag_metrics(tags)
    assert metrics == {"eval.reverse.exact_match": 0.95}
    [ok, missing] = check_requirements(parse_requirements(["eval.reverse.exact_match>=0.9", "eval.copy.token_f1>=0.5"]),
                                       metrics, version=3, name="bot")
    assert ok.passed and "eval.reverse.exact_match=0.95" in ok.message
    assert not missing.passed
    assert "no tag 'eval.copy.token_f1'" in missing.message
    assert "`platformctl eval submit EVAL.yaml --model bot/3`" in missing.message
    assert "dataset.name is 'copy'" in missing.message and "'token_f1'" in missing.message


def test_no_worse_than_on_eval_tags_names_the_evaluation_the_holder_lacks():
    cand = {"eval.reverse.exact_match": 0.8}
    [gate] = check_no_worse(["eval.reverse.exact_match"], cand, {}, version=5, alias="production", holder_version=4,
                            name="bot")
    assert not gate.passed
    assert "production (version 4) has no metric 'eval.reverse.exact_match'" in gate.message
    assert "`platformctl eval submit EVAL.yaml --model bot/4`" in gate.message
    [ok] = check_no_worse(["eval.reverse.exact_match"], cand, {"eval.reverse.exact_match": 0.7}, 5, "production", 4)
    assert ok.passed and "higher is better" in ok.message
