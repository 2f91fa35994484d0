"""Hyperparameter sweeps, the pure part: `--param PATH=V1,V2` parsing, checking, and trial specs.

`parse_params` turns `--param hyperparameters.learning_rate=1e-4,3e-4` into `SweepParam`s, checking
every path against `FineTuneSpec` (an unknown field names the fields that exist there) and every
value by applying it to the base spec and validating the result (a wrong type names the param and
what the field accepts), before any compute. `trial_overrides` enumerates the trials (grid: every
combination; random: `trials` draws, seeded), and `trial_spec` is the base spec with one trial's
values applied, validated like any spec, so each trial then goes through the normal resolve.
The flags build a `SweepSection` (`section_from_flags`), the same section a spec's `sweep:` holds
(a FineTuneJob's on Kubernetes), and `plan_from_section` turns either into the trials: one path for
the CLI and the operator. The sweep itself (`SweepPlan`) travels to the Ray job as JSON next to the
trials' resolved plans (`sweep_document`).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmplatform.errors import JobError
from llmplatform.specs import FineTuneSpec, SweepSection

SEARCHES = ("grid", "random")
MODES = ("min", "max")
EARLY_STOPS = ("none", "asha")
# What a trial reports (training/loop.py): the metrics a sweep can rank by.
METRICS = ("eval_loss", "eval_perplexity", "eval_token_accuracy", "loss")


MAX_SWEEP_JSON = 120_000  # bytes: one argument of the job's command line (Linux allows 128 KiB)


class SweepError(JobError):
    """A sweep the user asked for cannot run as given (message names the --param / flag, or the spec's
    `sweep.` field in `field`, and the fix)."""

    def __init__(self, message: str, field: str = "sweep"):
        self.field = field
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.field))


def _name(path: str, cli: bool) -> str:
    """How a message names a swept field: the flag (`--param PATH`) or the spec's section (`sweep.params.PATH`)."""
    return f"--param {path}" if cli else f"sweep.params.{path}"


def _flag(flag: str, cli: bool) -> str:
    return f"--{flag.replace('_', '-')}" if cli else f"sweep.{flag}"


@dataclass(frozen=True)
class SweepParam:
    path: str  # dotted FineTuneSpec field, e.g. "hyperparameters.learning_rate"
    values: tuple


@dataclass
class SweepPlan:
    """What the sweep's Ray job needs besides the trials' resolved plans."""

    params: list[SweepParam]
    search: str = "grid"
    trials: int | None = None  # random search: how many draws
    metric: str = "eval_loss"
    mode: str = "min"
    max_concurrent: int = 2
    early_stop: str = "none"
    seed: int = 0
    overrides: list[dict] = field(default_factory=list)  # one {path: value} per trial

    def to_dict(self) -> dict:
        return {**asdict(self), "params": [{"path": p.path, "values": list(p.values)} for p in self.params]}

    @classmethod
    def from_dict(cls, data: dict) -> "SweepPlan":
        params = [SweepParam(p["path"], tuple(p["values"])) for p in data.get("params", [])]
        return cls(**{**data, "params": params})


def _field_names(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def check_path(path: str, cli: bool = True) -> None:
    """`path` names a leaf field of FineTuneSpec; else SweepError naming what exists there."""
    model: type[BaseModel] = FineTuneSpec
    parts = path.split(".")
    at, field = _name(path, cli), f"sweep.params.{path}"
    if parts[0] == "sweep":
        raise SweepError(f"{at}: a sweep's own settings are not swept; sweep a training field", field)
    for i, part in enumerate(parts):
        fields = model.model_fields
        where = ".".join(parts[:i]) or "the spec"
        if part not in fields:
            raise SweepError(f"{at}: {where} has no field {part!r}; fields there: {', '.join(_field_names(model))}", field)
        annotation = fields[part].annotation
        last = i == len(parts) - 1
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if last and is_model:
            raise SweepError(f"{at}: {path} is a section, not a value; sweep one of its fields: "
                             + ", ".join(f"{path}.{n}" for n in _field_names(annotation)), field)
        if not last:
            if not is_model:
                raise SweepError(f"{at}: {'.'.join(parts[:i + 1])} is a value with no fields below it; use {_name('.'.join(parts[:i + 1]), cli)}", field)
            model = annotation
    if parts[0] == "name":
        raise SweepError(f"{at}: each trial's name is derived from the sweep's; sweep another field", field)


def apply_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    """A copy of the spec dict `base` with each dotted `path: value` set (pure)."""
    import copy

    out = copy.deepcopy(base)
    for path, value in overrides.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or node.get(part) is None else node[part]
        node[leaf] = value
    return out


def _validation_message(exc: ValidationError, path: str) -> str:
    msgs = [f"{'.'.join(str(x) for x in e['loc']) or path}: {e['msg']}" for e in exc.errors()]
    return "; ".join(msgs)


def trial_spec(base: FineTuneSpec, overrides: dict[str, Any], index: int) -> FineTuneSpec:
    """The base spec with one trial's values applied (validated; named `<base>-t<index>`)."""
    data = apply_overrides(base.model_dump(mode="json"), overrides)
    data["name"] = f"{base.name[:58]}-t{index}"
    data["sweep"] = None  # a trial is one training run
    try:
        return FineTuneSpec.model_validate(data)
    except ValidationError as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise SweepError(f"trial {index} ({given}) is not a valid spec: {_validation_message(exc, '')}") from None


def _scalar(text: str) -> Any:
    """`16` -> 16, `1e-4` -> 0.0001 (YAML 1.1 would keep that a string), `true` -> True, `adamw` -> "adamw"."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_param(text: str) -> SweepParam:
    """`PATH=V1,V2,...` -> SweepParam (path checked; values parsed, not yet validated)."""
    path, sep, values = text.partition("=")
    path = path.strip()
    if not sep or not path or not values.strip():
        raise SweepError(f"--param {text!r}: write it as PATH=V1,V2,... e.g. --param hyperparameters.learning_rate=1e-4,3e-4")
    check_path(path)
    parsed = tuple(_scalar(v) for v in values.split(",") if v.strip())
    if len(set(map(repr, parsed))) != len(parsed):
        raise SweepError(f"--param {text}: a value is repeated; list each value once")
    return SweepParam(path, parsed)


def check_values(params: list[SweepParam], base: FineTuneSpec, cli: bool = True) -> None:
    """Each value applied alone to the base must validate; else SweepError naming the param and the fix."""
    for p in params:
        if not p.values:
            raise SweepError(f"{_name(p.path, cli)}: give at least one value", f"sweep.params.{p.path}")
        if len(set(map(repr, p.values))) != len(p.values):
            raise SweepError(f"{_name(p.path, cli)}: a value is repeated; list each value once", f"sweep.params.{p.path}")
        for value in p.values:
            data = apply_overrides(base.model_dump(mode="json"), {p.path: value})
            try:
                FineTuneSpec.model_validate(data)
            except ValidationError as exc:
                fix = f"fix the value in --param {p.path}=..." if cli else f"fix the value in sweep.params.{p.path}"
                raise SweepError(f"{_name(p.path, cli)}={value!r}: {_validation_message(exc, p.path)}; {fix}", f"sweep.params.{p.path}") from None


def parse_params(texts: list[str], base: FineTuneSpec) -> list[SweepParam]:
    """Every --param, checked against the spec: each value applied alone to the base must validate."""
    if not texts:
        raise SweepError("a sweep needs at least one --param PATH=V1,V2,... (e.g. --param hyperparameters.learning_rate=1e-4,3e-4)")
    params = [parse_param(t) for t in texts]
    seen = [p.path for p in params]
    if len(set(seen)) != len(seen):
        raise SweepError(f"--param {next(p for p in seen if seen.count(p) > 1)} is given twice; list all its values in one --param")
    check_values(params, base)
    return params


def trial_overrides(params: list[SweepParam], search: str = "grid", trials: int | None = None, seed: int = 0, cli: bool = True) -> list[dict]:
    """The trials: grid = every combination (in --param order); random = `trials` seeded draws."""
    if search not in SEARCHES:
        raise SweepError(f"{_flag('search', cli)} {search!r} is unknown; use one of {', '.join(SEARCHES)}", "sweep.search")
    if search == "grid":
        if trials is not None:
            raise SweepError(f"{_flag('trials', cli)} goes with {_flag('search', cli)} random (a grid runs every combination)", "sweep.trials")
        return [dict(zip([p.path for p in params], combo)) for combo in itertools.product(*[p.values for p in params])]
    if not trials or trials < 1:
        raise SweepError(f"{_flag('search', cli)} random needs {_flag('trials', cli)} N (N >= 1)", "sweep.trials")
    rng = random.Random(seed)
    return [{p.path: rng.choice(p.values) for p in params} for _ in range(trials)]


def section_from_flags(texts: list[str], base: FineTuneSpec, *, search: str = "grid", trials: int | None = None, metric: str = "eval_loss",
                       mode: str = "min", max_concurrent: int = 2, early_stop: str = "none") -> SweepSection:
    """The `sweep:` section the CLI's flags describe (each flag checked, with the flag's name in the error)."""
    if metric not in METRICS:
        raise SweepError(f"--metric {metric!r} is not reported by training; use one of {', '.join(METRICS)}")
    if mode not in MODES:
        raise SweepError(f"--mode {mode!r}: use min or max")
    if early_stop not in EARLY_STOPS:
        raise SweepError(f"--early-stop {early_stop!r}: use asha (or leave it out)")
    if max_concurrent < 1:
        raise SweepError("--max-concurrent must be at least 1")
    if search not in SEARCHES:
        raise SweepError(f"--search {search!r} is unknown; use one of {', '.join(SEARCHES)}")
    params = parse_params(texts, base)
    return SweepSection(params={p.path: list(p.values) for p in params}, search=search, trials=trials, metric=metric, mode=mode,
                        max_concurrent=max_concurrent, early_stop=early_stop)


def plan_from_section(section: SweepSection, base: FineTuneSpec, cli: bool = False) -> tuple[SweepPlan, list[FineTuneSpec]]:
    """The sweep and its trial specs (all validated) from a `sweep:` section; no I/O. `cli`: name flags in errors."""
    if section.metric.startswith("eval_") and not base.data.validation and not base.data.validation_split:
        fix = "use --metric loss" if cli else "or set sweep.metric: loss"
        raise SweepError(f"{_flag('metric', cli)} {section.metric} needs validation data: set data.validation in the spec, {fix}", "sweep.metric")
    params = [SweepParam(path, tuple(values)) for path, values in section.params.items()]
    for p in params:
        check_path(p.path, cli)
    check_values(params, base, cli)
    overrides = trial_overrides(params, section.search, section.trials, base.hyperparameters.seed, cli)
    specs = [trial_spec(base, o, i) for i, o in enumerate(overrides)]
    plan = SweepPlan(params, section.search, section.trials, section.metric, section.mode, section.max_concurrent, section.early_stop,
                     base.hyperparameters.seed, overrides)
    return plan, specs


def build_plan(texts: list[str], base: FineTuneSpec, *, search: str = "grid", trials: int | None = None, metric: str = "eval_loss",
               mode: str = "min", max_concurrent: int = 2, early_stop: str = "none") -> tuple[SweepPlan, list[FineTuneSpec]]:
    """The sweep and its trial specs (all validated) from the CLI's flags; no I/O."""
    section = section_from_flags(texts, base, search=search, trials=trials, metric=metric, mode=mode, max_concurrent=max_concurrent,
                                 early_stop=early_stop)
    return plan_from_section(section, base, cli=True)


def sweep_document(sweep: SweepPlan, plans: list[dict], cli: bool = True) -> str:
    """`--sweep-json`'s text: the sweep and every trial's resolved plan; SweepError when it is too long for one
    argument of the job's command line."""
    import json

    doc = json.dumps({"sweep": sweep.to_dict(), "plans": plans}, separators=(",", ":"), sort_keys=True)
    if len(doc) > MAX_SWEEP_JSON:
        fewer = "--search random --trials N with a smaller N, or fewer --param values" if cli else "sweep.search: random with fewer sweep.trials, or fewer values in sweep.params"
        raise SweepError(f"{len(plans)} trials are too many for one sweep job's command line ({len(doc)} bytes of resolved plans, "
                         f"at most {MAX_SWEEP_JSON}); use {fewer}", "sweep.params")
    return doc


def best_trial(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The finished trial (one with an adapter) with the best final `metric`; None if none finished."""
    done = [r for r in rows if r.get("checkpoint_path") and isinstance(r.get(metric), (int, float))]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r[metric])
