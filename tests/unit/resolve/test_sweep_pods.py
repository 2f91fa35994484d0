"""`resolve.sweep_pods`: a sweep's worker group, from its trials' resolved plans (pure)."""

from __future__ import annotations

from llmplatform.resolve import Facts, resolve, sweep_pods
from llmplatform.specs import parse_spec


def _trial(workers: int, cpus: float = 1.0, gpus: float = 0.0):
    spec = parse_spec("finetune", {"name": "t", "base_model": "llama2-tiny", "data": {"train": "/d/t.jsonl"},
                                   "resources": {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus}})
    return resolve(spec, Facts(target="k8s")).require()


def test_the_group_holds_the_largest_trials_that_run_at_once():
    trials = [_trial(1), _trial(3), _trial(2), _trial(1, cpus=4)]
    pods = sweep_pods(trials, max_concurrent=2)
    assert pods["pods"] == 3 + 2 and pods["concurrent_trials"] == 2  # the two largest run together at worst
    assert pods["cpus_per_pod"] == max(t["pods"]["cpus_per_pod"] for t in trials)  # any trial's pod fits
    assert sweep_pods(trials, max_concurrent=10)["pods"] == 1 + 3 + 2 + 1  # never more than every trial


def test_gpu_trials_get_gpu_pods():
    pods = sweep_pods([_trial(2, gpus=1), _trial(1, gpus=1)], max_concurrent=1)
    assert (pods["pods"], pods["gpus_per_pod"]) == (2, 1)
