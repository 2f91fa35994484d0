"""Exact-match scoring of generated answers (the metric of the held-out evaluation)."""

from llmplatform.training.evaluate import exact_match


def test_exact_match_normalises_whitespace_only():
    assert exact_match(" 12\n", "12")
    assert exact_match("t  a c", "t a c")
    assert not exact_match("12.", "12")
    assert not exact_match("T a c", "t a c")
