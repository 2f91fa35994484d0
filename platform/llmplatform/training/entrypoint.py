"""The Ray job entrypoint for a fine-tuning job (also the command of the Kubernetes RayJob).

    python -m llmplatform.training.entrypoint --resolved-json '{...}' --job-id ID [--run-id RUN]

`--resolved-json` is the job's resolved plan (`llmplatform.resolve`, what `platformctl spec
resolve --output json` prints): the spec plus every derived value. Nothing is planned here. It
validates the data, makes sure the job's MLflow run exists, runs the `TorchTrainer`, then
uploads the final adapter, tokenizer, spec and data stats and registers the adapter. Progress,
the run, the result and a failure reason are printed as `PLATFORM_PROGRESS {json}` lines that the
backends read from the job log. SIGTERM (a cancel) marks the run KILLED and registers nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

from llmplatform import cpus
from llmplatform.errors import JobError, PlatformError, Problem
from llmplatform.resolve import Resolved, ResolveError
from llmplatform.specs import FineTuneSpec
from llmplatform.training.loop import emit


def plain_reason(exc: BaseException) -> str:
    """The innermost 'SomeError: message' line of an exception (Ray wraps worker errors)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Interrupt)\b.*:", ln)]
    reason = lines[-1] if lines else (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {reason}" if not lines and not reason.startswith(type(exc).__name__) else reason


def data_stats(spec: FineTuneSpec, tokenizer) -> tuple[dict, str]:
    """Validate the data (raises DataError with every bad line) -> (stats dict, dataset sha256)."""
    from llmplatform import data

    if spec.objective == "dpo":
        from llmplatform.data.preference import validate_preference_dataset

        report = validate_preference_dataset(spec, tokenizer)
    else:
        report = data.validate_dataset(spec, tokenizer, spec.data.max_seq_length)
    stats = report.to_dict() if hasattr(report, "to_dict") else dict(getattr(report, "__dict__", {}))
    return stats, data.dataset_sha256(spec.data.train)


def resolve_tracking_uri(spec: FineTuneSpec, given: str | None) -> str:
    """--tracking-uri, else the spec's mlflow.tracking_uri, else $MLFLOW_TRACKING_URI (cluster
    code never asks the local stack: its backends pass --tracking-uri)."""
    found = given or spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not found:
        raise JobError("no MLflow tracking server for this job: pass --tracking-uri, set mlflow.tracking_uri in the spec, "
                       "or set MLFLOW_TRACKING_URI in the job's environment")
    return found


def run_job(plan: Resolved, job_id: str, run_id: str | None, tracking_uri: str, base_dir: str | None = None) -> dict:
    """Train, log and register; returns the result (run id, adapter URI, registered version)."""
    spec: FineTuneSpec = plan.spec  # type: ignore[assignment]
    from llmplatform.basemodels import locate
    from llmplatform.training import mlflow_logging as ml
    from llmplatform.training import trainer
    from llmplatform.training.model_setup import load_tokenizer

    if not run_id:
        run_id, _ = ml.create_run(tracking_uri, spec, job_id)
    emit("run", run_id=run_id, url=ml.run_url(tracking_uri, run_id))

    def _stop(signum, frame):  # a cancel before Ray is up; afterwards Ray's own handler raises SystemExit
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _stop)
    try:
        base_dir = base_dir or locate(spec.base_model)
        tokenizer = load_tokenizer(base_dir)
        stats, sha = data_stats(spec, tokenizer)
        ml.set_tags(tracking_uri, run_id, {"dataset_sha256": sha, "base_model": spec.base_model, "platform.job_id": job_id})
        ml.log_resolved(tracking_uri, run_id, plan.to_dict())
        loop_config = {"base_dir": base_dir, "run_id": run_id, "tracking_uri": tracking_uri, "job_id": job_id}
        result = trainer.fit(plan, job_id, loop_config)
        if result.checkpoint is None:
            raise RuntimeError("training ended without a checkpoint")
        version = publish(result.checkpoint, spec, run_id, tracking_uri, base_dir, job_id, sha, stats, result.metrics or {})
    except (SystemExit, KeyboardInterrupt):  # SIGTERM from `finetune cancel`: KILLED, nothing registered
        ml.end_run(tracking_uri, run_id, "KILLED")
        emit("cancelled")
        raise
    except BaseException as exc:
        reason = plain_reason(exc)
        ml.set_tags(tracking_uri, run_id, {"failure_reason": reason[:5000]})
        ml.end_run(tracking_uri, run_id, "FAILED")
        emit("failed", reason=reason)
        raise
    ml.end_run(tracking_uri, run_id, "FINISHED")
    out = {"run_id": run_id, "adapter_uri": f"runs:/{run_id}/adapter", "registered_model": spec.mlflow.registered_model_name, "version": version, "metrics": dict(result.metrics or {})}
    emit("result", **out)
    return out


def publish(checkpoint, spec, run_id: str, tracking_uri: str, base_dir: str, job_id: str, sha: str, stats: dict, metrics: dict) -> str | None:
    """Upload a finished run's adapter and tokenizer from its Ray Train `checkpoint` to `run_id` and
    register the adapter (the spec's registered model) with its lineage; the version, if registered."""
    from llmplatform.training import mlflow_logging as ml

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(checkpoint.to_directory(tmp))
        ml.log_outputs(tracking_uri, run_id, local / "adapter", local / "tokenizer", spec, {**stats, "dataset_sha256": sha})
        lineage = {"base_model": spec.base_model, "dataset_sha256": sha, "run_id": run_id, "job_id": job_id, "git_sha": ml.git_sha(), "method": spec.method,
                   "spec": spec.model_dump(mode="json"), "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        return ml.register(tracking_uri, spec, local / "adapter", run_id, lineage, base_dir)


def _json_arg(text: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ResolveError("--resolved-json", [Problem("(json)", f"not valid JSON: {exc}")]) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmplatform.training.entrypoint", description=__doc__.splitlines()[0])
    parser.add_argument("--resolved-json", required=True, help="the job's resolved plan as JSON (platformctl spec resolve --output json)")
    parser.add_argument("--job-id", required=True, help="unique job id (also the Ray Train run name)")
    parser.add_argument("--run-id", default=None, help="existing MLflow run to log into")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server (default: the spec's, else $MLFLOW_TRACKING_URI)")
    parser.add_argument("--base-dir", default=None, help="already-resolved base model directory")
    args = parser.parse_args(argv)
    cpus.use_all_cpus()  # data checks and tokenizing run here; a partitioned stack started us on its front CPUs
    try:
        plan = Resolved.from_dict(_json_arg(args.resolved_json), "--resolved-json")
        if plan.kind != "finetune":
            raise ResolveError("--resolved-json", [Problem("kind", "this is a serve plan; the training entrypoint needs a fine-tune plan", plan.kind, "finetune")])
        run_job(plan, args.job_id, args.run_id, resolve_tracking_uri(plan.spec, args.tracking_uri), args.base_dir)
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
