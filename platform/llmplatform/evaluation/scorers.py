"""The scorer registry: pure functions `(prediction, reference, **params) -> float in [0, 1]`.

Built-in scorers are named in `SCORERS` (exact_match, contains, token_f1, regex, json_valid);
`MODEL_SCORERS` (perplexity of the reference) need the model and are computed by the runner;
a user scorer is named by import path, `python:package.module:function`, with the same
signature (it may return a bool or a number). A scorer's parameters are its keyword-only
arguments: `check_params` reports unknown and missing ones before any model is loaded.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import string
from collections import Counter
from typing import Any, Callable

USER_PREFIX = "python:"
USER_SCORER = re.compile(r"^python:(?P<module>[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)$")
_PUNCTUATION = string.punctuation + "¿¡«»“”‘’"


def collapse_whitespace(text: str) -> str:
    """Collapse runs of whitespace and strip."""
    return re.sub(r"\s+", " ", text).strip()


def normalize_answer(text: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> str:
    """Whitespace collapsed; lowercased and with surrounding punctuation stripped when asked."""
    text = collapse_whitespace(text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.strip(_PUNCTUATION + " ")
    return text


def exact_match(prediction: str, reference: str, *, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """1.0 when the normalized prediction equals the normalized reference (whitespace always collapsed)."""
    return float(normalize_answer(prediction, ignore_case, ignore_punctuation)
                 == normalize_answer(reference, ignore_case, ignore_punctuation))


def contains(prediction: str, reference: str, *, ignore_case: bool = True) -> float:
    """1.0 when the normalized reference occurs in the prediction."""
    ref = normalize_answer(reference, ignore_case)
    return float(bool(ref) and ref in normalize_answer(prediction, ignore_case, ignore_punctuation=False))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over whitespace tokens of the normalized texts (1.0 when both are empty)."""
    pred = [t.strip(_PUNCTUATION) for t in normalize_answer(prediction).split()]
    ref = [t.strip(_PUNCTUATION) for t in normalize_answer(reference).split()]
    pred, ref = [t for t in pred if t], [t for t in ref if t]
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def regex(prediction: str, reference: str, *, pattern: str, full: bool = False) -> float:
    """1.0 when `pattern` matches the stripped prediction (anywhere; the whole text with `full`)."""
    text = prediction.strip()
    found = re.fullmatch(pattern, text) if full else re.search(pattern, text)
    return float(found is not None)


def json_valid(prediction: str, reference: str) -> float:
    """1.0 when the stripped prediction parses as JSON."""
    try:
        json.loads(prediction.strip())
    except ValueError:
        return 0.0
    return 1.0


SCORERS: dict[str, Callable[..., float]] = {"exact_match": exact_match, "contains": contains, "token_f1": token_f1,
                                            "regex": regex, "json_valid": json_valid}


# Scorers that need the model, not just the answer: the runner computes them with a forward pass.
# perplexity: exp(mean negative log-likelihood of the reference tokens given the prompt), per example.
MODEL_SCORERS = ("perplexity",)


class ScorerError(ValueError):
    """A scorer name or its parameters are wrong (a user mistake, reported before any compute)."""


def known_scorers() -> str:
    """The accepted names, for error messages."""
    return ", ".join([*SCORERS, *MODEL_SCORERS]) + f", or {USER_PREFIX}package.module:function"


def check_name(name: str) -> None:
    """Raise ScorerError unless `name` is a built-in scorer or a well-formed user scorer path."""
    if name in SCORERS or name in MODEL_SCORERS or USER_SCORER.match(name):
        return
    if name.startswith(USER_PREFIX):
        raise ScorerError(f"scorer {name!r} is not an import path; write {USER_PREFIX}package.module:function")
    raise ScorerError(f"unknown scorer {name!r}; known scorers: {known_scorers()}")


def load(name: str) -> Callable[..., Any]:
    """The scorer function for `name`; a user scorer is imported (ScorerError when it cannot be).
    A model scorer (perplexity) has no function here: None."""
    check_name(name)
    if name in MODEL_SCORERS:
        return None
    if name in SCORERS:
        return SCORERS[name]
    m = USER_SCORER.match(name)
    try:
        fn = getattr(importlib.import_module(m.group("module")), m.group("function"))
    except (ImportError, AttributeError) as exc:
        raise ScorerError(f"scorer {name!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ScorerError(f"scorer {name!r} is not a function")
    return fn


def check_params(name: str, params: dict) -> None:
    """Unknown or missing keyword parameters of a built-in scorer (user scorers are checked when called)."""
    if name in MODEL_SCORERS and params:
        raise ScorerError(f"scorer {name!r}: unknown parameter(s) {sorted(params)} (accepted: none)")
    fn = SCORERS.get(name)
    if fn is None:
        return
    kw = {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(params) - set(kw))
    missing = sorted(k for k, p in kw.items() if p.default is inspect.Parameter.empty and k not in params)
    problems = ([f"unknown parameter(s) {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
    if problems:
        raise ScorerError(f"scorer {name!r}: {'; '.join(problems)} (accepted: {sorted(kw) or 'none'})")
    if name == "regex":
        try:
            re.compile(params["pattern"])
        except (re.error, TypeError) as exc:
            raise ScorerError(f"scorer 'regex': pattern {params['pattern']!r} is not a valid regular expression: {exc}") from exc


def score(fn: Callable[..., Any], prediction: str, reference: str, params: dict) -> float:
    """One example's score as a float (bools become 0/1); a non-number result is a TypeError."""
    value = fn(prediction, reference, **params)
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"scorer returned {type(value).__name__}, expected a number or bool")
