"""Engine choice and vLLM engine arguments (pure; vLLM itself runs in the vllm tier)."""

from __future__ import annotations

import importlib.util

from llmplatform.serving.engines import pick_engine, vllm_usable
from llmplatform.serving.engines.vllm import cpu_shard_binding, engine_args, shard_cpus
from llmplatform.stack.cpus import CpuPartition


def test_auto_picks_vllm_only_when_importable():
    ok, why = vllm_usable()
    assert ok == (importlib.util.find_spec("vllm") is not None)
    assert pick_engine("auto") == ("vllm" if ok else "hf")
    assert not ok or why
    assert pick_engine("hf") == "hf" and pick_engine("vllm") == "vllm"


def test_vllm_tp_uses_the_ray_executor_on_gpus_and_local_shards_on_cpu():
    args = engine_args("/m", dtype="bfloat16", max_model_len=4096, tensor_parallel=2, max_batch_size=64, max_loaded_adapters=8,
                       cuda=True)
    assert args["tensor_parallel_size"] == 2 and args["distributed_executor_backend"] == "ray"
    assert "gpu_memory_utilization" not in args  # vLLM's GPU default, unless PLATFORM_VLLM_MEMORY_FRACTION says otherwise
    assert args["enable_lora"] and args["max_loras"] == 8 and args["max_num_seqs"] == 64
    single = engine_args("/m", dtype="auto", max_model_len=512, tensor_parallel=1, max_batch_size=8, max_loaded_adapters=2)
    assert "distributed_executor_backend" not in single and single["dtype"] == "auto"
    cpu = engine_args("/m", dtype="bfloat16", max_model_len=512, tensor_parallel=2, max_batch_size=8, max_loaded_adapters=2, cuda=False)
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
    from llmplatform.serving.replica import serves_adapters
    from llmplatform.specs import parse_spec

    def spec(**model):
        return parse_spec("serve", {"name": "s", "engine": "vllm", "model": {"base": "llama2-7b", **model}})

    assert not serves_adapters(spec(allow_dynamic_adapters=False))
    assert serves_adapters(spec())  # dynamic adapters are on by default
    assert serves_adapters(spec(allow_dynamic_adapters=False, adapters=[{"name": "a", "source": "/tmp/a"}]))
    assert serves_adapters(spec(base=None, registry="models:/bot@production", allow_dynamic_adapters=False))
    args = engine_args("/m", dtype="bfloat16", max_model_len=512, tensor_parallel=1, max_batch_size=8, max_loaded_adapters=2,
                       enable_lora=False)
    assert args["enable_lora"] is False and "max_loras" not in args and "max_lora_rank" not in args


def test_replicas_get_serves_fast_path_and_hf_keeps_user_code_off_the_replica_loop():
    from llmplatform.serving.app import replica_env

    vllm = replica_env({"PLATFORM_HOME": "/h", "UNRELATED": "x"}, "vllm")
    assert vllm["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and vllm["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert vllm["PLATFORM_HOME"] == "/h" and "UNRELATED" not in vllm and "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in vllm
    assert replica_env({}, "hf")["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
    assert replica_env({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}, "vllm")["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"  # the caller wins
