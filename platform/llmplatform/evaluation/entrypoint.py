"""The Ray job entrypoint of an evaluation job (`platformctl eval submit --target ray`).

    python -m llmplatform.evaluation.entrypoint --spec-json '{...}' --tracking-uri URI

Runs `runner.run_eval` (the same code `--target local` runs in the calling process) and prints
the report as one `PLATFORM_PROGRESS {"kind": "eval_report", ...}` line that the submitting side
reads from the job log. A refused or failed job prints `{"kind": "failed", "reason": ...}` and
exits 1; so does a job where a model failed (a metric raised on every example), after its report.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmplatform.errors import PlatformError
from llmplatform.specs import parse_spec
from llmplatform.training.loop import emit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec-json", required=True, help="the EvaluationSpec as JSON")
    parser.add_argument("--tracking-uri", required=True, help="the MLflow server runs and tags go to")
    args = parser.parse_args(argv)
    from llmplatform.evaluation.runner import run_eval

    try:
        report = run_eval(parse_spec("eval", json.loads(args.spec_json)), args.tracking_uri)
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
