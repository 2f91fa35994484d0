"""Promotion gates: `--require eval_loss<=1.2` and `--no-worse-than production`, as pure functions.

A requirement compares one logged metric of the candidate version's run with a number
(operators <=, <, >=, >, ==). "No worse than ALIAS" compares the candidate with the version that
holds ALIAS now, on the gate metrics: the metrics named in the requirements, or, when there are
none, every `eval*` metric both runs logged. Direction: a metric whose name contains loss,
perplexity, ppl, error or latency is better when lower; every other metric is better when higher.
Ties pass. Each gate gives a `GateResult` whose message carries both numbers. Evaluation jobs'
scores are tags `eval.<dataset>.<metric>` on the version; a requirement naming one reads it.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import asdict, dataclass

from llmplatform.errors import RegistryError

OPERATORS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "latency")
EVAL_TAG = re.compile(r"^eval\.(?P<dataset>[A-Za-z0-9][A-Za-z0-9_\-]*)\.(?P<metric>[A-Za-z0-9][A-Za-z0-9_\-]*)$")
REQUIREMENT = re.compile(r"^\s*(?P<metric>[A-Za-z_][\w./\-]*?)\s*(?P<op><=|>=|==|<|>)\s*(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Requirement:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class GateResult:
    gate: str        # "eval_loss<=1.2" or "no-worse-than production: eval_loss"
    passed: bool
    message: str     # what was compared, with both numbers

    def to_dict(self) -> dict:
        return asdict(self)


def lower_is_better(metric: str) -> bool:
    """The direction rule: loss/perplexity/ppl/error/latency metrics improve downwards."""
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def parse_requirements(texts: list[str] | tuple[str, ...]) -> list[Requirement]:
    """Parse every `--require` at once; all bad ones are reported together."""
    parsed, bad = [], []
    for text in texts or ():
        m = REQUIREMENT.match(text)
        if m:
            parsed.append(Requirement(m.group("metric"), m.group("op"), float(m.group("value"))))
        else:
            bad.append(text)
    if bad:
        raise RegistryError(f"--require {', '.join(repr(b) for b in bad)}: write METRIC OP NUMBER, e.g. eval_loss<=1.2 "
                            f"(operators: {', '.join(OPERATORS)})")
    return parsed


def eval_tag_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The numeric `eval.<dataset>.<metric>` tags of a model version (set by evaluation jobs)."""
    out = {}
    for key, value in tags.items():
        if EVAL_TAG.match(key):
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                continue  # e.g. eval.<dataset>.run_id
    return out


def missing_eval_hint(metric: str, name: str | None, version: int) -> str:
    """For a missing `eval.<dataset>.<metric>`: the evaluation that would set it, as a command."""
    m = EVAL_TAG.match(metric)
    if not m:
        return ""
    model = f"{name}/{version}" if name else f"NAME/{version}"
    return (f"; evaluate it first: `platformctl eval submit EVAL.yaml --model {model}` with an eval spec whose "
            f"dataset.name is {m.group('dataset')!r} and whose metrics include {m.group('metric')!r} "
            "(or add `--evaluate EVAL.yaml` to this promote)")


def check_requirements(reqs: list[Requirement], metrics: dict[str, float], version: int,
                       name: str | None = None) -> list[GateResult]:
    """Each requirement against the candidate's metrics (a metric it never logged fails; a missing
    `eval.<dataset>.<metric>` tag names the `platformctl eval submit` command that would set it)."""
    results = []
    for req in reqs:
        value = metrics.get(req.metric)
        if value is None or math.isnan(value):
            if EVAL_TAG.match(req.metric):
                results.append(GateResult(str(req), False, f"gate {req} failed: version {version} has no tag "
                                          f"{req.metric!r} (not evaluated on that dataset)"
                                          + missing_eval_hint(req.metric, name, version)))
                continue
            logged = ", ".join(sorted(metrics)) or "none"
            results.append(GateResult(str(req), False, f"gate {req} failed: version {version} has no metric "
                                      f"{req.metric!r} (logged: {logged})"))
            continue
        ok = OPERATORS[req.op](value, req.threshold)
        verdict = "passed" if ok else "failed"
        results.append(GateResult(str(req), ok, f"gate {req} {verdict}: version {version} has "
                                  f"{req.metric}={value:g}, required {req.op} {req.threshold:g}"))
    return results


def gate_metrics(reqs: list[Requirement], candidate: dict[str, float], holder: dict[str, float]) -> list[str]:
    """The metrics "no worse than" compares: those required, else the `eval*` ones both logged."""
    if reqs:
        return list(dict.fromkeys(r.metric for r in reqs))
    return sorted(m for m in candidate if m.startswith("eval") and m in holder)


def check_no_worse(metrics: list[str], candidate: dict[str, float], holder: dict[str, float], version: int,
                   alias: str, holder_version: int, name: str | None = None) -> list[GateResult]:
    """Candidate vs the alias holder on each metric; a metric missing on either side fails."""
    if not metrics:
        return [GateResult(f"no-worse-than {alias}", False, f"gate no-worse-than {alias} failed: version {version} and "
                           f"{alias} (version {holder_version}) share no eval* metric; name one with --require")]
    results = []
    for metric in metrics:
        gate = f"no-worse-than {alias}: {metric}"
        mine, theirs = candidate.get(metric), holder.get(metric)
        if mine is None or theirs is None:
            missing = f"version {version}" if mine is None else f"{alias} (version {holder_version})"
            hint = missing_eval_hint(metric, name, version if mine is None else holder_version)
            results.append(GateResult(gate, False, f"gate {gate} failed: {missing} has no metric {metric!r}{hint}"))
            continue
        lower = lower_is_better(metric)
        ok = mine <= theirs if lower else mine >= theirs
        direction = "lower" if lower else "higher"
        verdict = "passed" if ok else "failed"
        results.append(GateResult(gate, ok, f"gate {gate} {verdict}: version {version} has {metric}={mine:g}, "
                                  f"{alias} (version {holder_version}) has {metric}={theirs:g}; {direction} is better"))
    return results
