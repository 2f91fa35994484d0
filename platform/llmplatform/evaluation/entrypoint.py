"""The Ray job entrypoint of an evaluation job (`platformctl eval submit --target ray`, and an
EvaluationJob's RayJob on Kubernetes).

    python -m llmplatform.evaluation.entrypoint --spec-json '{...}' [--tracking-uri URI] [--job-id ID]

Without `--tracking-uri` the MLflow server is `$MLFLOW_TRACKING_URI` (a Ray pod's, from the
platform's Secret); `--job-id` is tagged `platform.job_id` on every run (the operator reads an
EvaluationJob's results from them).

Runs `runner.run_eval` (the same code `--target local` runs in the calling process) and prints
the report as one `PLATFORM_PROGRESS {"kind": "eval_report", ...}` line that the submitting side
reads from the job log. A refused or failed job prints `{"kind": "failed", "reason": ...}` and
exits 1; so does a job where a model failed (a metric raised on every example), after its report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llmplatform.errors import EvalError, PlatformError
from llmplatform.specs import parse_spec
from llmplatform.training.loop import emit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec-json", required=True, help="the EvaluationSpec as JSON")
    parser.add_argument("--tracking-uri", default=None, help="the MLflow server runs and tags go to (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--job-id", default=None, help="tagged platform.job_id on every run")
    args = parser.parse_args(argv)
    from llmplatform.evaluation.runner import run_eval

    try:
        tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            raise EvalError("no MLflow tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI in the job's environment")
        report = run_eval(parse_spec("eval", json.loads(args.spec_json)), tracking_uri, args.job_id)
    except PlatformError as exc:
        emit("failed", reason=str(exc))
        return 1
    emit("eval_report", name=report.name, dataset=report.dataset, examples=report.examples, models=report.rows())
    if report.failed():
        emit("failed", reason="; ".join(report.failed()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
