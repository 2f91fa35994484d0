"""The Ray job of a hyperparameter sweep: every trial a Ray Train run inside one Ray Tune `Tuner`.

    python -m llmplatform.training.sweep --sweep-json '{...}' --resolved-json '{...}' --job-id ID [--run-id PARENT] ...

`--resolved-json` is the base spec's plan (the parent MLflow run's); `--sweep-json` holds the
`SweepPlan` and each trial's own resolved plan (`llmplatform.resolve`, computed by the CLI:
nothing is planned here; on Kubernetes the operator resolved them). Without `--run-id` (a
FineTuneJob's RayJob) the driver creates the parent run itself. Before Tune starts, it creates one
MLflow child run per trial (tag `mlflow.parentRunId`). Each trial is a function trainable that runs the platform's
`TorchTrainer` with Tune's report callback, so the metrics the loop reports at eval steps reach
Tune (and ASHA, which ranks trials at eval-step milestones). At the end the parent gets the best
finished trial's params and metric, and only that trial's adapter is uploaded and registered.
Trial changes are `PLATFORM_PROGRESS {"kind": "trial", ...}` lines (the CLI's live table). SIGTERM
(a cancel) ends Tune, whose trial actors and their Ray Train workers die with this driver, and
marks the parent and every unfinished child KILLED.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from llmplatform import cpus
from llmplatform.errors import PlatformError
from llmplatform.resolve import Resolved
from llmplatform.training.loop import emit
from llmplatform.training.sweep_params import SweepPlan, best_trial

TRIAL_KEYS = ("step", "total_steps", "loss", "eval_loss", "eval_perplexity", "eval_token_accuracy", "checkpoint_path")


def trial_job_id(job_id: str, index: int) -> str:
    return f"{job_id}-t{index}"


def make_trainable(plans: list[dict], run_ids: list[str], job_id: str, tracking_uri: str, base_dir: str):
    """Tune's function trainable: trial `config["trial"]` runs its resolved plan on Ray Train."""

    def run_trial(config: dict) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from llmplatform.training import mlflow_logging as ml
        from llmplatform.training import trainer

        index = int(config["trial"])
        plan = Resolved.from_dict(plans[index], f"trial {index}")
        loop_config = {"base_dir": base_dir, "run_id": run_ids[index], "tracking_uri": tracking_uri, "job_id": trial_job_id(job_id, index)}
        try:
            trainer.build_trainer(plan, trial_job_id(job_id, index), loop_config, callbacks=[TuneReportCallback()]).fit()
        except BaseException:
            ml.end_run(tracking_uri, run_ids[index], "FAILED")
            raise
        ml.end_run(tracking_uri, run_ids[index], "FINISHED")

    return run_trial


def ran_to_the_end(result: dict) -> bool:
    """Whether a trial's last report is its last step (not stopped early by the scheduler or a cancel)."""
    return result.get("step") is not None and result["step"] >= result.get("total_steps", float("inf"))


def trial_row(index: int, overrides: dict, state: str, result: dict | None) -> dict:
    row = {"trial": index, "state": state, **overrides}
    row.update({k: result[k] for k in TRIAL_KEYS if result and k in result})
    return row


def events_callback(sweep: SweepPlan):
    """A Tune callback printing a `trial` progress event per result and per end."""
    from ray.tune import Callback

    class TrialEvents(Callback):
        def _emit(self, trial, state: str, result: dict | None = None) -> None:
            index = int(trial.config["trial"])
            row = trial_row(index, sweep.overrides[index], state, result if result is not None else trial.last_result)
            emit("trial", **{k: v for k, v in row.items() if k != "checkpoint_path"}, params=sweep.overrides[index])

        def on_trial_start(self, iteration, trials, trial, **info):
            self._emit(trial, "running", {})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._emit(trial, "running", result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._emit(trial, "finished" if ran_to_the_end(trial.last_result or {}) else "stopped")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._emit(trial, "failed")

    return TrialEvents()


def tuner_for(sweep: SweepPlan, trainable, base: Resolved, job_id: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from llmplatform.training.trainer import storage_path

    scheduler = None
    if sweep.early_stop == "asha":  # milestones every eval cadence: eval, 2x, 4x ... (reduction factor 2)
        every = base["eval_every_n_steps"] or base.spec.eval.every_n_steps
        scheduler = ASHAScheduler(time_attr="step", grace_period=every, reduction_factor=2, max_t=10**9)
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.01}),  # the trial only drives (Tune refuses 0); its Ray Train workers hold the CPUs/GPUs
        param_space={"trial": tune.grid_search(list(range(len(sweep.overrides))))},
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler, max_concurrent_trials=sweep.max_concurrent),
        run_config=tune.RunConfig(name=job_id, storage_path=storage_path(base), callbacks=[events_callback(sweep)], verbose=0),
    )


def register_best(best: dict, plan: Resolved, run_id: str, tracking_uri: str, base_dir: str, job_id: str, sha: str, stats: dict) -> str | None:
    """Upload the best trial's adapter to its child run and register it (the spec's registered model)."""
    from ray.train import Checkpoint

    from llmplatform.training.entrypoint import publish

    metrics = {k: v for k, v in best.items() if k in TRIAL_KEYS}
    return publish(Checkpoint(best["checkpoint_path"]), plan.spec, run_id, tracking_uri, base_dir, job_id, sha, stats, metrics)


def run_sweep(sweep: SweepPlan, base: Resolved, plans: list[dict], job_id: str, parent_id: str | None, tracking_uri: str, base_dir: str | None = None) -> dict:
    from llmplatform.basemodels import locate
    from llmplatform.training import mlflow_logging as ml
    from llmplatform.training.entrypoint import data_stats, plain_reason
    from llmplatform.training.model_setup import load_tokenizer

    if not parent_id:  # a RayJob the operator built: nobody created the parent run before the job
        parent_id, _ = ml.create_run(tracking_uri, base.spec, job_id)
    emit("run", run_id=parent_id, url=ml.run_url(tracking_uri, parent_id))
    signal.signal(signal.SIGTERM, _stop)
    children: list[str] = []
    try:
        base_dir = base_dir or locate(base.spec.base_model)
        stats, sha = data_stats(base.spec, load_tokenizer(base_dir))
        ml.set_tags(tracking_uri, parent_id, {"platform.sweep": json.dumps([p.path for p in sweep.params]), "dataset_sha256": sha, "sweep.metric": sweep.metric,
                                              "sweep.mode": sweep.mode, "sweep.trials": str(len(plans))})
        for i, plan in enumerate(plans):
            spec = Resolved.from_dict(plan, f"trial {i}").spec
            run_id, _ = ml.create_run(tracking_uri, spec, trial_job_id(job_id, i), {"mlflow.parentRunId": parent_id, "sweep.trial": str(i),
                                                                                   "sweep.job_id": job_id, "dataset_sha256": sha})
            children.append(run_id)
        emit("trials", run_ids=children, overrides=sweep.overrides)
        grid = tuner_for(sweep, make_trainable(plans, children, job_id, tracking_uri, base_dir), base, job_id).fit()
        rows = []
        for result in grid:
            index = int(result.config["trial"])
            rows.append(trial_row(index, sweep.overrides[index], "failed" if result.error else "done", result.metrics or {}))
        finished = [r for r in rows if ran_to_the_end(r)]
        best = best_trial(finished, sweep.metric, sweep.mode)
        for r in rows:  # Tune may end a trial's actor on its last result, before the trial marks its own run
            if r in finished:
                ml.end_run(tracking_uri, children[r["trial"]], "FINISHED")
            else:
                ml.set_tags(tracking_uri, children[r["trial"]], {"sweep.stopped_at_step": str(r.get("step", 0))})
                ml.end_run(tracking_uri, children[r["trial"]], "KILLED")
        if best is None:
            raise RuntimeError(f"no trial of sweep {job_id} finished: see `platformctl finetune logs {job_id}`")
        i = best["trial"]
        ml.client(tracking_uri).log_batch(parent_id, params=_params(sweep.overrides[i]))
        ml.client(tracking_uri).log_metric(parent_id, f"best_{sweep.metric}", float(best[sweep.metric]))
        ml.set_tags(tracking_uri, parent_id, {"sweep.best_trial": str(i), "sweep.best_run_id": children[i]})
        version = register_best(best, Resolved.from_dict(plans[i], f"trial {i}"), children[i], tracking_uri, base_dir, trial_job_id(job_id, i), sha, stats)
    except (SystemExit, KeyboardInterrupt):
        for run_id in [parent_id, *children]:
            ml.end_run(tracking_uri, run_id, "KILLED")
        emit("cancelled")
        raise
    except BaseException as exc:
        reason = plain_reason(exc)
        ml.set_tags(tracking_uri, parent_id, {"failure_reason": reason[:5000]})
        for run_id in [parent_id, *children]:
            ml.end_run(tracking_uri, run_id, "FAILED")
        emit("failed", reason=reason)
        raise
    ml.end_run(tracking_uri, parent_id, "FINISHED")
    out = {"run_id": parent_id, "best_trial": i, "best_run_id": children[i], "best_params": sweep.overrides[i], "metric": sweep.metric,
           "value": best[sweep.metric], "registered_model": base.spec.mlflow.registered_model_name, "version": version, "trials": rows}
    emit("result", **out)
    return out


def _stop(signum, frame):  # `finetune cancel`: SIGTERM from the Jobs API
    raise SystemExit(143)


def _params(overrides: dict) -> list:
    from mlflow.entities import Param

    return [Param(f"best.{k}", str(v)) for k, v in overrides.items()]


def main(argv: list[str] | None = None) -> int:
    from llmplatform.training.entrypoint import _json_arg, resolve_tracking_uri

    parser = argparse.ArgumentParser(prog="llmplatform.training.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-json", required=True, help='{"sweep": SweepPlan, "plans": [each trial\'s resolved plan]}')
    parser.add_argument("--resolved-json", required=True, help="the base spec's resolved plan (the parent run's)")
    parser.add_argument("--job-id", required=True, help="the sweep's job id (its trials' Ray Train runs are ID-t<N>)")
    parser.add_argument("--run-id", default=None, help="the parent MLflow run (default: a new one)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server (default: the spec's, else $MLFLOW_TRACKING_URI)")
    parser.add_argument("--base-dir", default=None, help="already-resolved base model directory")
    args = parser.parse_args(argv)
    cpus.use_all_cpus()
    try:
        doc = _json_arg(args.sweep_json)
        base = Resolved.from_dict(_json_arg(args.resolved_json), "--resolved-json")
        run_sweep(SweepPlan.from_dict(doc["sweep"]), base, doc["plans"], args.job_id, args.run_id, resolve_tracking_uri(base.spec, args.tracking_uri), args.base_dir)
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
