"""Building and running the Ray Train `TorchTrainer` for a fine-tuning spec.

Pure builders (`scaling_config`, `run_config`) turn a spec into Ray configs; `fit` runs them.
The run name is the job id: Ray resumes a run with a reused name from its stored state, so job
ids must be unique (`new_job_id`), and a restart after a worker failure continues from the last
checkpoint of that same run.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from llmplatform import paths
from llmplatform.specs import FineTuneSpec


def new_job_id(spec: FineTuneSpec) -> str:
    """A unique, DNS-safe job id: `<name>-<yyyymmdd-hhmmss>-<4 hex>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{spec.name[:40]}-{stamp}-{secrets.token_hex(2)}"


def storage_path(spec: FineTuneSpec) -> str:
    """Where checkpoints go: the spec's URI, else `<PLATFORM_HOME>/checkpoints`."""
    return spec.checkpoint.storage_uri or str(paths.platform_home() / "checkpoints")


def has_validation(spec: FineTuneSpec) -> bool:
    return bool(spec.data.validation) or spec.data.validation_split > 0


def checkpoint_metric(spec: FineTuneSpec) -> tuple[str, str]:
    """(metric, mode) that ranks checkpoints; eval metrics fall back to train loss without eval data."""
    metric, mode = spec.checkpoint.metric, spec.checkpoint.mode
    if metric.startswith("eval_") and not has_validation(spec):
        return "loss", "min"
    return metric, mode


def scaling_config(spec: FineTuneSpec):
    from ray.train import ScalingConfig

    r = spec.resources
    resources = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        resources["GPU"] = r.gpus_per_worker
    return ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=resources)


def run_config(spec: FineTuneSpec, job_id: str, storage: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    metric, mode = checkpoint_metric(spec)
    storage = storage or storage_path(spec)
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
    return RunConfig(
        name=job_id,
        storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_best, checkpoint_score_attribute=metric, checkpoint_score_order=mode),
        failure_config=FailureConfig(max_failures=spec.resources.max_failures),
    )


def build_trainer(spec: FineTuneSpec, job_id: str, loop_config: dict, storage: str | None = None):
    from ray.train.torch import TorchConfig, TorchTrainer

    from llmplatform.training.loop import train_loop_per_worker

    backend = "nccl" if spec.resources.gpus_per_worker else "gloo"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=scaling_config(spec),
        run_config=run_config(spec, job_id, storage),
    )


def fit(spec: FineTuneSpec, job_id: str, loop_config: dict, storage: str | None = None):
    """Run training to the end; returns the Ray `Result` (raises on unrecoverable failure)."""
    return build_trainer(spec, job_id, loop_config, storage).fit()
