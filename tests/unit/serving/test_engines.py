"""Engine choice, vLLM engine arguments, and where the vllm engine puts vLLM's processes (vLLM itself runs in the vllm tier)."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest

from llmplatform.serving.engines import vllm_usable
from llmplatform.serving.engines import vllm as vllm_engine
from llmplatform.serving.engines.vllm import cpu_shard_binding, engine_args, shard_cpus
from llmplatform.cpus import CpuPartition


def test_auto_picks_vllm_only_when_importable():
    from llmplatform.backends.facts import serve_facts
    from llmplatform.resolve import resolve
    from llmplatform.specs import parse_spec

    ok, why = vllm_usable()
    assert ok == (importlib.util.find_spec("vllm") is not None)
    assert not ok or why
    spec = parse_spec("serve", {"name": "s", "model": {"base": "llama2-tiny"}, "engine": "auto"})
    plan = resolve(spec, serve_facts(spec, "local"))
    assert plan["engine"] == ("vllm" if ok else "hf") and plan.source("engine") == "target"


SLOTS = {"max_loras": 2, "max_cpu_loras": 4}


def test_vllm_tp_uses_the_ray_executor_on_gpus_and_local_shards_on_cpu():
    args = engine_args("/m", dtype="bfloat16", max_model_len=4096, tensor_parallel=2, max_batch_size=64,
                       lora_slots={"max_loras": 8, "max_cpu_loras": 16}, cuda=True)
    assert args["tensor_parallel_size"] == 2 and args["distributed_executor_backend"] == "ray"
    assert "gpu_memory_utilization" not in args  # vLLM's GPU default, unless PLATFORM_VLLM_MEMORY_FRACTION says otherwise
    assert args["enable_lora"] and args["max_loras"] == 8 and args["max_cpu_loras"] == 16 and args["max_num_seqs"] == 64
    single = engine_args("/m", dtype="auto", max_model_len=512, tensor_parallel=1, max_batch_size=8, lora_slots=SLOTS, cuda=False)
    assert "distributed_executor_backend" not in single and single["dtype"] == "auto"
    # JSON without whitespace padding (vLLM allows that only with a named backend) and json_object closed in time
    assert single["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert single["logits_processors"] == ["llmplatform.serving.engines.vllm_json:JsonObjectCloser"]  # CPU: the V1 model runner
    assert args["structured_outputs_config"] == single["structured_outputs_config"] and "logits_processors" not in args  # GPUs: V2
    cpu = engine_args("/m", dtype="bfloat16", max_model_len=512, tensor_parallel=2, max_batch_size=8, lora_slots=SLOTS, cuda=False)
    assert cpu["distributed_executor_backend"] == "mp"  # vLLM's CPU backend refuses the Ray executor


def test_cpu_shards_get_disjoint_cpu_groups():
    assert cpu_shard_binding([0, 1], 2) == "0|1"
    assert cpu_shard_binding([7, 4, 5, 6, 0, 1, 2, 3], 2) == "0,1,2,3|4,5,6,7"
    assert cpu_shard_binding([0, 1, 2], 2) == "0|1"  # equal shares; the spare CPU is left to the front end
    assert cpu_shard_binding([0], 2) is None and cpu_shard_binding([1, 0], 1) == "0,1"


def test_cpu_shards_run_on_the_model_cpus_of_a_partitioned_stack():
    part = CpuPartition(front=(7,), model=(0, 1, 2, 3, 4, 5, 6))
    assert shard_cpus(1, part, [7], numa_nodes=1) == [0, 1, 2, 3, 4, 5, 6]  # the replica itself runs on the front CPU
    assert cpu_shard_binding(shard_cpus(2, part, [7], numa_nodes=1), 2) == "0,1,2|3,4,5"
    small = CpuPartition(front=(1,), model=(0,))
    assert shard_cpus(2, small, [1], numa_nodes=1) == [0, 1]  # fewer model CPUs than shards: the whole partition
    # no partition: leave vLLM's own NUMA binding alone unless it would fail
    assert shard_cpus(1, None, [0, 1], numa_nodes=1) is None and shard_cpus(2, None, [0, 1], numa_nodes=2) is None
    assert shard_cpus(2, None, [0, 1], numa_nodes=1) == [0, 1]


def test_base_only_deployments_run_vllm_without_lora_layers():
    from llmplatform.resolve import Facts, resolve
    from llmplatform.specs import parse_spec

    def serves_adapters(**model) -> bool:
        spec = parse_spec("serve", {"name": "s", "engine": "vllm", "model": {"base": "llama2-7b", **model}})
        return resolve(spec, Facts(vllm_available=True))["enable_lora"]

    assert not serves_adapters(allow_dynamic_adapters=False)
    assert serves_adapters()  # dynamic adapters are on by default
    assert serves_adapters(allow_dynamic_adapters=False, adapters=[{"name": "a", "source": "/tmp/a"}])
    assert serves_adapters(base=None, registry="models:/bot@production", allow_dynamic_adapters=False)
    args = engine_args("/m", dtype="bfloat16", max_model_len=512, tensor_parallel=1, max_batch_size=8,
                       enable_lora=False)
    assert args["enable_lora"] is False and "max_loras" not in args and "max_lora_rank" not in args


def test_replicas_get_serves_fast_path_and_hf_keeps_user_code_off_the_replica_loop():
    from llmplatform.serving.environment import replica_env

    vllm = replica_env({"PLATFORM_HOME": "/h", "UNRELATED": "x"}, "vllm")
    assert vllm["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and vllm["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert vllm["PLATFORM_HOME"] == "/h" and "UNRELATED" not in vllm and "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in vllm
    assert replica_env({}, "hf")["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
    assert replica_env({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}, "vllm")["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"  # the caller wins


def _named_child(name: str) -> subprocess.Popen:
    """A child process whose command name is `name` (as vLLM names its processes)."""
    proc = subprocess.Popen([sys.executable, "-c", f"import time; open('/proc/self/comm', 'w').write({name!r}); print('up', flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a partition needs 2 CPUs")
@pytest.mark.parametrize("allowed", [True, False])
def test_partitioned_start_puts_helpers_on_the_front_and_raises_the_schedulers_priority(monkeypatch, caplog, allowed, may_lower_nice):
    cpu_ids = sorted(os.sched_getaffinity(0))
    part = CpuPartition(front=(cpu_ids[-1],), model=tuple(cpu_ids[:-1]))
    caplog.set_level(logging.INFO, logger=vllm_engine.__name__)
    if not allowed:  # as for a user without root, CAP_SYS_NICE or a limits.conf entry
        monkeypatch.setattr(vllm_engine.cpus, "set_process_nice", lambda pid, nice: False)
    kids: list[subprocess.Popen] = []
    try:
        engine, nice = vllm_engine._start_partitioned(
            lambda: kids.extend(_named_child(n) for n in ("VLLM::EngineCore", "VLLM::Worker", "python")) or "engine", part)
        core, worker, helper = (k.pid for k in kids)
        assert engine == "engine"
        assert os.sched_getaffinity(helper) == set(part.front)  # vLLM's helpers back on the front-end CPUs
        assert os.sched_getaffinity(worker) == os.sched_getaffinity(core) == set(part.all)  # (vLLM binds the shard itself)
        if allowed and may_lower_nice:
            assert nice == vllm_engine.SCHEDULER_NICE == os.getpriority(os.PRIO_PROCESS, core)
        else:
            assert nice is None and os.getpriority(os.PRIO_PROCESS, core) == os.getpriority(os.PRIO_PROCESS, 0)
            assert "keeps Ray's worker CPU priority" in caplog.text and "limits.conf" in caplog.text
        assert os.getpriority(os.PRIO_PROCESS, worker) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        for k in kids:
            k.kill()
            k.wait()
