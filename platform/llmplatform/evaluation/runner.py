"""Run an `EvaluationSpec` in this process: resolve models, generate, score, then record.

Each model is resolved as serving resolves it (a base name through `llmplatform.basemodels`, a
registered `NAME@ALIAS` / `NAME/VERSION` through `llmplatform.registry.resolve`, whose lineage
names the base). Answers come from the platform's own `HFEngine` (one per base model, adapters
loaded by path; greedy, `generation.batch_size` sequences decoded together). Every model is
generated and scored before anything is written. A scorer that raises on an example does not stop
the job: the failure (example index and line, model, exception) is recorded, counted as
`eval.<dataset>.<metric>.errors`, and the metric's mean is over the examples that scored. A metric
that raised on every example is an error for that model: its run is marked FAILED and nothing is
tagged on its version. Then one MLflow run per model gets the mean scores as
`eval.<dataset>.<metric>` metrics and the per-example table `eval/<dataset>.json`, and each
registered version that scored gets the same `eval.<dataset>.<metric>` tags the promotion gates read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmplatform.errors import DataError, EvalError, Problem
from llmplatform.evaluation import scorers
from llmplatform.specs import REGISTRY_URI, EvaluationSpec, MetricSpec

@dataclass(frozen=True)
class ModelTarget:
    """One model of the spec, resolved: what to load and, for a registered version, where to tag."""

    label: str                       # as written in the spec
    base: str                        # base model name / directory (basemodels.locate takes it)
    adapter_path: str | None = None
    registered: str | None = None    # registered model name
    version: int | None = None


@dataclass(frozen=True)
class Example:
    index: int          # 0-based position in the dataset (after `limit`)
    location: str       # "line 12"
    question: str
    reference: str
    prompt_ids: list[int]
    input_ids: list[int] = field(default_factory=list)  # prompt + reference tokens, as in training
    labels: list[int] = field(default_factory=list)     # -100 on the prompt


@dataclass(frozen=True)
class ScoreFailure:
    """A scorer that raised on one example of one model."""

    metric: str
    scorer: str
    index: int          # the example's 0-based index
    location: str       # "line 4"
    model: str          # the model's label
    error: str          # "ValueError: boom"

    def describe(self) -> str:
        return (f"scorer {self.scorer!r} (metric {self.metric!r}) raised on example {self.index} ({self.location}) "
                f"of model {self.model!r}: {self.error}")


@dataclass
class ModelResult:
    target: ModelTarget
    answers: list[str]
    scores: dict[str, list[float | None]]   # metric -> one score per example; None where the scorer raised
    failures: list[ScoreFailure] = field(default_factory=list)
    run_id: str | None = None

    def scored(self) -> dict[str, int]:
        """Per metric: how many examples have a score."""
        return {m: sum(x is not None for x in v) for m, v in self.scores.items()}

    def errors(self) -> dict[str, int]:
        """Per metric: how many examples its scorer raised on."""
        return {m: sum(x is None for x in v) for m, v in self.scores.items()}

    def means(self) -> dict[str, float]:
        """Per metric: the mean over the examples that scored (a metric with none is left out)."""
        return {m: sum(x for x in v if x is not None) / n for m, v in self.scores.items()
                if (n := sum(x is not None for x in v))}

    def error(self) -> str | None:
        """Why this model's evaluation failed (a metric raised on every example), or None."""
        dead = [m for m, v in self.scores.items() if v and all(x is None for x in v)]
        if not dead:
            return None
        first = {f.metric: f for f in reversed(self.failures)}
        reasons = "; ".join(f"metric {m!r} raised on all {len(self.scores[m])} examples "
                            f"(first: {first[m].location}: {first[m].error})" for m in dead)
        return f"model {self.target.label!r}: {reasons}; nothing was tagged for it"


@dataclass
class EvalReport:
    name: str
    dataset: str
    examples: int
    results: list[ModelResult] = field(default_factory=list)
    items: list[Example] = field(default_factory=list)  # the examples, for the table artifact

    def rows(self) -> list[dict]:
        """One row per model, metrics flattened (what the CLI prints); a metric's value is its mean
        over `scored[metric]` examples, None when every example raised."""
        rows = []
        for r in self.results:
            means = r.means()
            rows.append({"model": r.target.label, "registered": r.target.registered, "version": r.target.version,
                         "examples": self.examples,
                         **{m: round(means[m], 4) if m in means else None for m in r.scores},
                         "scored": r.scored(), "errors": r.errors(),
                         "failures": [vars(f) for f in r.failures], "error": r.error(), "run_id": r.run_id})
        return rows

    def failed(self) -> list[str]:
        """The error of every model with a metric that raised on every example."""
        return [e for r in self.results if (e := r.error())]


def tag_key(dataset: str, metric: str) -> str:
    """The version tag (and run metric) a gate reads: `eval.<dataset>.<metric>`."""
    return f"eval.{dataset}.{metric}"


def parse_model(text: str) -> tuple[str, str | None, int | None]:
    """(name, alias, version) of a registered reference (`NAME@ALIAS`, `NAME/VERSION`, with or without
    `models:/`, the registry's own grammar); alias and version are None for a base model."""
    from llmplatform.registry.refs import parse_ref

    uri = "models:/" + text.strip().removeprefix("models:/")
    if not REGISTRY_URI.match(uri) or Path(text).expanduser().is_dir():
        return text, None, None
    ref = parse_ref(uri)
    return ref.name, ref.alias, ref.version


def resolve_models(spec: EvaluationSpec, tracking_uri: Any) -> list[ModelTarget]:
    """Every model of the spec made concrete (registered adapters downloaded and verified)."""
    targets = []
    for label in spec.models:
        name, alias, version = parse_model(label)
        if alias is None and version is None:
            targets.append(ModelTarget(label=label, base=label))
            continue
        from llmplatform.registry.resolve import resolve

        ref = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
        adapter = resolve(tracking_uri, ref)
        if not adapter.base_model:
            raise EvalError(f"models: {label!r} (version {adapter.version}) records no base model in its lineage; "
                            "it cannot be evaluated")
        targets.append(ModelTarget(label=label, base=str(adapter.base_model), adapter_path=str(adapter.local_path),
                                   registered=name, version=adapter.version))
    return targets


def load_examples(spec: EvaluationSpec, tokenizer) -> list[Example]:
    """The dataset's records as prompts (built as in training) and references (the last assistant turn)."""
    from llmplatform.data import load_records, tokenize_record
    from llmplatform.training.evaluate import prompt_ids

    ds = spec.dataset
    records = load_records(ds.path, ds.format)[: ds.limit]  # DataError lists every record without a reference
    texts = [Problem(r.location, "a text record has no answer to score", accepted="conversation records (chat, sharegpt, prompt_completion, alpaca)")
             for r in records if r.shape == "text"]
    if texts:
        raise DataError(ds.path, texts)
    examples = []
    for i, record in enumerate(records):
        question = next((m["content"] for m in reversed(record.messages) if m["role"] == "user"), "")
        full = tokenize_record(record, tokenizer, ds.max_seq_length)  # tokenised once: prompt, and labels for perplexity
        examples.append(Example(i, record.location, question, record.messages[-1]["content"], prompt_ids(full),
                                list(full.input_ids), list(full.labels)))
    return examples


def score_examples(examples: list[Example], answers: list[str], metrics: list[MetricSpec],
                   functions: dict[str, Callable], label: str) -> tuple[dict[str, list[float | None]], list[ScoreFailure]]:
    """Every metric on every example: (metric -> scores, None where the scorer raised; the failures)."""
    scores: dict[str, list[float | None]] = {m.metric: [] for m in metrics if m.scorer not in scorers.MODEL_SCORERS}
    failures: list[ScoreFailure] = []
    for ex, answer in zip(examples, answers):
        for m in metrics:
            if m.scorer in scorers.MODEL_SCORERS:
                continue
            try:
                value = scorers.score(functions[m.scorer], answer, ex.reference, m.params)
            except Exception as exc:  # a user scorer's bug on one example: counted, the job goes on
                value = None
                failures.append(ScoreFailure(m.metric, m.scorer, ex.index, ex.location, label,
                                             f"{type(exc).__name__}: {exc}"))
            scores[m.metric].append(value)
    return scores, failures


async def _generate(engine, prompts: list[list[int]], max_tokens: int, adapter_id: str | None) -> list[str]:
    from llmplatform.serving.engines import GenerationRequest

    async def one(ids: list[int]) -> str:
        parts = []
        req = GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, temperature=0.0, adapter_id=adapter_id)
        async for event in engine.generate(req):
            parts.append(event.get("text", ""))
        return "".join(parts)

    return list(await asyncio.gather(*(one(p) for p in prompts)))  # the engine batches them


def reference_perplexity(engine, examples: list[Example], adapter_id: str | None, batch_size: int) -> list[float]:
    """Per example: exp(mean NLL of its reference tokens given its prompt), through the engine's
    model with the adapter applied per row as the engine's own decode step does."""
    import math

    out: list[float] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        out += [math.exp(v) for v in engine.mean_nll([(e.input_ids, e.labels) for e in chunk], adapter_id)]
    return out


def _engine_threads() -> int:
    """Torch threads of the job's engine: half the cores, 1 to 4 (bench/eval.py gives its peer the same)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _engine(base: str, spec: EvaluationSpec):
    from llmplatform.basemodels import locate
    from llmplatform.serving.engines.hf import HFEngine

    # min_admit: every example is queued at once, so rows freed by short answers are refilled half a batch at a time
    # (one prefill pass per refill instead of one per freed row: 128 reverse examples, batch 16: 0.71 s vs 0.85 s)
    batch = spec.generation.batch_size
    return HFEngine(locate(base), dtype="float32", max_batch_size=batch, min_admit=max(1, batch // 2),
                    max_model_len=spec.dataset.max_seq_length + spec.generation.max_tokens, threads=_engine_threads())


def evaluate(spec: EvaluationSpec, targets: list[ModelTarget]) -> EvalReport:
    """Generate and score every target; pure of MLflow (nothing is written here)."""
    from llmplatform.serving.engines import EngineError

    functions = {m.scorer: scorers.load(m.scorer) for m in spec.metrics}  # user scorers import before any compute
    report, examples = EvalReport(spec.name, spec.dataset.name, 0), None
    for base in dict.fromkeys(t.base for t in targets):
        engine = _engine(base, spec)
        try:
            if examples is None:
                examples = load_examples(spec, engine.tokenizer)
                report.examples = len(examples)
            for t in (t for t in targets if t.base == base):
                adapter_id = None
                if t.adapter_path:
                    adapter_id = f"{t.registered}/{t.version}"
                    try:
                        engine.load_adapter(adapter_id, t.adapter_path)
                    except EngineError as exc:
                        raise EvalError(f"models: {t.label!r}: {exc}") from exc
                answers = asyncio.run(_generate(engine, [e.prompt_ids for e in examples],
                                                spec.generation.max_tokens, adapter_id))
                scores, failures = score_examples(examples, answers, spec.metrics, functions, t.label)
                for m in (m for m in spec.metrics if m.scorer == "perplexity"):
                    scores[m.metric] = reference_perplexity(engine, examples, adapter_id, spec.generation.batch_size)
                report.results.append(ModelResult(t, answers, {m.metric: scores[m.metric] for m in spec.metrics},
                                                  failures))
        finally:
            engine.shutdown()
    report.results.sort(key=lambda r: [t.label for t in targets].index(r.target.label))
    report.items = examples or []
    return report


def record(tracking_uri: Any, spec: EvaluationSpec, report: EvalReport, job_id: str | None = None) -> EvalReport:
    """One MLflow run per model (mean metrics, error counts, per-example table), then the version
    tags of every registered model that has no failed metric. `job_id` (an EvaluationJob's) is
    tagged `platform.job_id` on every run, so the operator finds this job's runs."""
    from llmplatform.registry import client as mc

    client = mc.connect(tracking_uri)
    exp_id = mc.experiment_id(client, spec.mlflow.experiment)
    ds, examples = spec.dataset.name, report.items
    for r in report.results:
        run = client.create_run(exp_id, run_name=f"{spec.name}-{r.target.label}",
                                tags={"llmplatform.kind": "eval", "eval.job": spec.name, "eval.dataset": ds,
                                      "eval.model": r.target.label, **({"platform.job_id": job_id} if job_id else {})})
        run_id = run.info.run_id
        client.log_param(run_id, "model", r.target.label)
        client.log_param(run_id, "base_model", r.target.base)
        client.log_param(run_id, "dataset", spec.dataset.path)
        client.log_param(run_id, "examples", report.examples)
        for metric, value in r.means().items():
            client.log_metric(run_id, tag_key(ds, metric), value)
        for metric, count in r.errors().items():
            client.log_metric(run_id, f"{tag_key(ds, metric)}.errors", count)
        if r.error():
            client.set_tag(run_id, "eval.error", r.error())
        table = {"index": [e.index for e in examples], "question": [e.question for e in examples],
                 "reference": [e.reference for e in examples], "answer": r.answers, **r.scores}
        for metric in (m for m, n in r.errors().items() if n):
            errors = {f.index: f.error for f in r.failures if f.metric == metric}
            table[f"{metric}.error"] = [errors.get(e.index) for e in examples]
        client.log_table(run_id, data=table, artifact_file=f"eval/{ds}.json")
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run ..." links; stdout is the report's
            client.set_terminated(run_id, status="FAILED" if r.error() else "FINISHED")
        r.run_id = run_id
    for r in report.results:  # tags last: every run is written before any version changes
        if r.target.registered and not r.error():
            for metric, value in r.means().items():
                client.set_model_version_tag(r.target.registered, str(r.target.version), tag_key(ds, metric), f"{value:.6g}")
            client.set_model_version_tag(r.target.registered, str(r.target.version), f"eval.{ds}.run_id", r.run_id)
    return report


def run_eval(spec: EvaluationSpec, tracking_uri: Any, job_id: str | None = None) -> EvalReport:
    """The whole job: resolve, generate and score every model, then record (see module docstring)."""
    targets = resolve_models(spec, tracking_uri)
    return record(tracking_uri, spec, evaluate(spec, targets), job_id)


def evaluate_missing(tracking_uri: Any, spec: EvaluationSpec, name: str, versions: list[int]) -> EvalReport | None:
    """Run `spec` on those of `name`'s versions that lack any of its `eval.<dataset>.<metric>` tags
    (what `models promote --evaluate` does before its gates); None when every version has them all."""
    from llmplatform.registry import client as mc

    client = mc.connect(tracking_uri)
    keys = [tag_key(spec.dataset.name, m.metric) for m in spec.metrics]
    todo = [v for v in dict.fromkeys(versions)
            if not all(k in (mc.get_version(client, name, v).tags or {}) for k in keys)]
    if not todo:
        return None
    return run_eval(spec.model_copy(update={"models": [f"{name}/{v}" for v in todo]}), tracking_uri)
