"""Building and running the Ray Train `TorchTrainer` for a fine-tuning spec.

Pure builders (`scaling_config`, `run_config`) put the resolved plan (`llmplatform.resolve`) in
Ray's config shapes, deciding nothing themselves; `fit` runs them.
The run name is the job id: Ray resumes a run with a reused name from its stored state, so a
restart after a worker failure continues from the last checkpoint of that same run, and a job id
names one training run: `new_job_id` makes a fresh one per CLI submit; the operator derives a
FineTuneJob's from its namespace, name and spec, so resubmitting the same job after its cluster
died resumes it (`llmoperator.reconcile.finetune.job_id`).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from llmplatform import paths
from llmplatform.resolve import Resolved
from llmplatform.specs import FineTuneSpec


def new_job_id(spec: FineTuneSpec) -> str:
    """A unique, DNS-safe job id: `<name>-<yyyymmdd-hhmmss>-<4 hex>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{spec.name[:40]}-{stamp}-{secrets.token_hex(2)}"


def storage_path(plan: Resolved) -> str:
    """Where checkpoints go: the plan's URI; `$PLATFORM_HOME` (a target without a known home)
    is this node's PLATFORM_HOME."""
    return plan["checkpoint_storage"].replace("$PLATFORM_HOME", str(paths.platform_home()))


def scaling_config(plan: Resolved):
    """Ray Train's ScalingConfig, exactly as resolved: workers, CPUs/GPUs each, use_gpu."""
    from ray.train import ScalingConfig

    resources = {"CPU": plan["cpus_per_worker"]}
    if plan["gpus_per_worker"]:
        resources["GPU"] = plan["gpus_per_worker"]
    return ScalingConfig(num_workers=plan["workers"], use_gpu=plan["use_gpu"], resources_per_worker=resources)


def run_config(plan: Resolved, job_id: str, storage: str | None = None, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    metric, mode = plan["checkpoint_metric"]
    storage = storage or storage_path(plan)
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
    return RunConfig(
        name=job_id,
        storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=plan["checkpoints_kept"], checkpoint_score_attribute=metric, checkpoint_score_order=mode),
        failure_config=FailureConfig(max_failures=plan.spec.resources.max_failures),
        callbacks=callbacks,  # a sweep's trial passes Tune's report callback
    )


def build_trainer(plan: Resolved, job_id: str, loop_config: dict, storage: str | None = None, callbacks: list | None = None):
    from ray.train.torch import TorchConfig, TorchTrainer

    from llmplatform.training.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "plan": plan.to_dict()},
        torch_config=TorchConfig(backend=plan["backend"]),
        scaling_config=scaling_config(plan),
        run_config=run_config(plan, job_id, storage, callbacks),
    )


def fit(plan: Resolved, job_id: str, loop_config: dict, storage: str | None = None):
    """Run training to the end; returns the Ray `Result` (raises on unrecoverable failure).

    First prints what Ray Train is asked for (a `train_config` progress event in the job log), so
    a job that can't get its workers or devices shows the request it made."""
    from llmplatform.training.loop import emit

    trainer = build_trainer(plan, job_id, loop_config, storage)
    sc, rc = trainer.scaling_config, trainer.run_config
    emit("train_config", num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=sc.resources_per_worker,
         backend=plan["backend"], run_name=rc.name, storage_path=rc.storage_path)
    return trainer.fit()
