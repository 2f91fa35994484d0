"""The one resolve step: every derived value with its source, refusals listed at once, and the
document that travels with the work (round trip, refusal of bare specs and stale versions)."""

from __future__ import annotations

import json

import pytest
import yaml

from llmplatform.cli.main import main
from llmplatform.resolve import Facts, RegistryFact, Resolved, ResolveError, resolve
from llmplatform.specs import parse_spec


def ft(**over):
    body = {"name": "ft", "base_model": "llama2-7b", "data": {"train": "s3://b/t.jsonl"}, **over}
    return parse_spec("finetune", body)


def sv(**over):
    body = {"name": "sv", "model": {"base": "llama2-7b-chat"}, **over}
    return parse_spec("serve", body)


def test_a_gpu_type_alone_makes_a_gpu_job_and_every_value_says_where_it_came_from():
    plan = resolve(ft(method="qlora", resources={"gpu_type": "a100-80gb", "workers": 2})).require()
    assert (plan["use_gpu"], plan["gpus_per_worker"], plan["backend"], plan["workers"]) == (True, 1.0, "nccl", 2)
    assert plan.source("gpus_per_worker") == "planner" and plan.source("workers") == "spec"
    assert plan["strategy"] == "ddp" and "holds" in plan.values["strategy"].reason
    assert plan["precision"] == "bf16" and plan["quantization"]["quant_type"] == "nf4"
    assert 0 < plan["memory_per_worker_gib"] < 76 and plan.source("memory_per_worker_gib") == "planner"
    assert plan["pods"] == {"pods": 2, "workers_per_pod": 1, "gpus_per_pod": 1, "cpus_per_pod": 2.0, "memory_gb_per_pod": 16.0}
    assert plan["checkpoint_metric"] == ["eval_loss", "min"] and plan["eval_every_n_steps"] == 50
    no_eval = resolve(ft(data={"train": "s3://b/t.jsonl", "validation_split": 0})).require()
    assert no_eval["checkpoint_metric"] == ["loss", "min"] and no_eval["eval_every_n_steps"] is None  # no validation data: ranked by loss
    cpu = resolve(ft(base_model="llama2-tiny")).require()
    assert (cpu["use_gpu"], cpu["backend"], cpu["precision"], cpu.source("use_gpu")) == (False, "gloo", "fp32", "default")


def test_fsdp_exactly_when_the_planner_says_one_gpu_cannot_hold_it():
    big = resolve(ft(base_model="llama2-70b", resources={"gpu_type": "a100-80gb"}, hyperparameters={"micro_batch_size": 1, "gradient_checkpointing": True})).require()
    assert big["strategy"] == "fsdp" and big.source("strategy") == "planner" and big["workers"] > 1 and big.source("workers") == "planner"
    t4 = resolve(ft(method="qlora", resources={"gpu_type": "t4-16gb"}, hyperparameters={"micro_batch_size": 1, "gradient_checkpointing": True})).require()
    assert t4["precision"] == "fp16" and t4["quantization"]["compute_dtype"] == "float16"  # Turing has no bfloat16


def test_serve_values_come_from_the_spec_planner_registry_and_target():
    reg = "models:/bot@production"
    facts = Facts(vllm_available=True, registry={reg: RegistryFact(reg, 7, "llama2-70b-chat", 128)})
    plan = resolve(sv(model={"registry": reg}, tensor_parallel="auto", resources={"gpu_type": "a100-80gb"}), facts).require()
    assert plan["base_model"] == "llama2-70b-chat" and plan.source("base_model") == "registry"
    assert plan["engine"] == "vllm" and plan.source("engine") == "target"
    assert plan["tensor_parallel"] >= 2 and plan.source("tensor_parallel") == "planner"
    assert len(plan["placement"]["bundles"]) == plan["tensor_parallel"] and plan["placement"]["strategy"] == "STRICT_PACK"
    assert plan["registry"] == {"ref": reg, "pinned": "models:/bot/7", "version": 7}
    assert plan["max_lora_rank"] == 128 and plan.source("max_lora_rank") == "registry"  # a rank-128 adapter starts vLLM at 128
    assert plan["registry_poll_s"] == 10.0 and plan["topology"] == "colocated"
    assert resolve(sv(), Facts(vllm_available=False))["engine"] == "hf"


def test_max_lora_rank_reaches_the_engine_arguments():
    from llmplatform.serving.engines.vllm import engine_args

    reg = "models:/wide@prod"
    plan = resolve(sv(engine="vllm", model={"base": "llama2-7b", "registry": reg}), Facts(vllm_available=True, registry={reg: RegistryFact(reg, 1, "llama2-7b", 128)})).require()
    args = engine_args("/m", dtype="auto", max_model_len=plan["max_model_len"], tensor_parallel=plan["tensor_parallel"], max_batch_size=8,
                       lora_slots=plan["lora_slots"], max_lora_rank=plan["max_lora_rank"], enable_lora=plan["enable_lora"], cuda=True)
    assert args["max_lora_rank"] == 128


def test_vllm_adapter_slots_come_from_the_plan():
    """max_loaded_adapters adapters share a batch (never more than the batch holds), twice as many stay in host
    memory; none for the hf engine or a base-only deployment."""
    from llmplatform.serving.engines.vllm import engine_args

    plan = resolve(sv(engine="vllm", max_loaded_adapters=6, limits={"max_batch_size": 4}), Facts(vllm_available=True)).require()
    assert plan["lora_slots"] == {"max_loras": 4, "max_cpu_loras": 12} and plan.source("lora_slots") == "spec"
    args = engine_args("/m", dtype="auto", max_model_len=512, tensor_parallel=1, max_batch_size=4, lora_slots=plan["lora_slots"], cuda=True)
    assert (args["max_loras"], args["max_cpu_loras"]) == (4, 12)
    assert resolve(sv(engine="hf"), Facts())["lora_slots"] is None
    base_only = resolve(sv(engine="vllm", model={"base": "llama2-7b", "allow_dynamic_adapters": False}), Facts(vllm_available=True))
    assert base_only["lora_slots"] is None and not base_only["enable_lora"]
    with pytest.raises(ValueError, match="lora_slots"):
        engine_args("/m", dtype="auto", max_model_len=512, tensor_parallel=1, max_batch_size=4, cuda=True)


def test_an_adapter_above_the_engines_rank_is_refused_at_resolve_and_at_load(tmp_path):
    from llmplatform.serving.engines import EngineError
    from llmplatform.serving.engines.vllm import check_rank

    reg = "models:/huge@prod"
    refused = resolve(sv(engine="vllm", model={"base": "llama2-7b", "adapters": [{"name": "h", "source": reg}]}),
                      Facts(vllm_available=True, registry={reg: RegistryFact(reg, 2, "llama2-7b", 1024)}))
    [problem] = refused.problems
    assert problem.location == "model.adapters[0] (h)" and "1024" in problem.message and "512" in problem.accepted
    capped = resolve(sv(engine="vllm", max_lora_rank=16, model={"base": "llama2-7b", "adapters": [{"name": "a", "source": str(tmp_path)}]}),
                     Facts(vllm_available=True, adapter_ranks={"a": 64}))
    assert [p.location for p in capped.problems] == ["model.adapters[0] (a)"]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 128}))
    with pytest.raises(EngineError) as err:  # a dynamic adapter named at request time: a 400, not a vLLM failure mid-request
        check_rank("dyn/1", str(tmp_path), 64)
    assert err.value.status == 400 and "max_lora_rank 64" in str(err.value)
    check_rank("dyn/1", str(tmp_path), 128)


def test_the_document_round_trips_and_refuses_what_is_not_a_current_plan():
    plan = resolve(ft(resources={"gpu_type": "l4-24gb"}, method="qlora", hyperparameters={"gradient_checkpointing": True})).require()
    back = Resolved.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.spec == plan.spec and back.values == plan.values and back.plan == plan.plan
    with pytest.raises(ResolveError, match="not a resolved plan"):
        Resolved.from_dict(plan.spec.model_dump(mode="json"))
    with pytest.raises(ResolveError, match="another platform version"):
        Resolved.from_dict({**plan.to_dict(), "version": 99})
    bad = resolve(ft(base_model="llama2-70b", resources={"gpu_type": "t4-16gb"}))
    assert "gradient_checkpointing: true" in bad.problems[0].accepted  # the fix is named
    with pytest.raises(ResolveError, match="must not run"):
        Resolved.from_dict(bad.to_dict())


def _write(path, body) -> str:
    path.write_text(yaml.safe_dump(body))
    return str(path)


def test_spec_resolve_names_all_three_unsatisfiable_values(tmp_path, capsys):
    adapter = tmp_path / "wide-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 64}))
    spec = _write(tmp_path / "serve.yaml", {
        "name": "three-problems", "engine": "vllm", "max_lora_rank": 16, "tensor_parallel": 1,
        "model": {"base": "llama2-70b-chat", "adapters": [{"name": "wide", "source": str(adapter)}], "allow_dynamic_adapters": False},
        "resources": {"gpu_type": "a10g-24gb"},
    })
    code = main(["spec", "resolve", spec, "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert sorted(p["location"] for p in out["problems"]) == ["engine", "model.adapters[0] (wide)", "tensor_parallel"]
    code = main(["spec", "resolve", spec])
    text = capsys.readouterr().out
    assert code == 1 and "3 value(s) cannot be satisfied" in text and "needs 8 x a10g-24gb" in text


def test_spec_resolve_prints_sources_and_takes_a_gpu_type(tmp_path, capsys):
    spec = _write(tmp_path / "ft.yaml", {"name": "g", "base_model": "llama2-13b", "method": "qlora", "data": {"train": "s3://b/t.jsonl"},
                                         "hyperparameters": {"micro_batch_size": 1}})
    assert main(["spec", "resolve", spec, "--gpu-type", "h100-80gb", "--output", "yaml"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["kind"] == "ResolvedFineTune" and doc["values"]["gpu_type"] == {"value": "h100-80gb", "source": "target", "reason": ""}
    assert doc["values"]["use_gpu"]["value"] is True and doc["plan"]["gpu"] == "h100-80gb"
    assert main(["spec", "resolve", spec]) == 0
    assert "use_gpu" in capsys.readouterr().out
    assert main(["plan", spec, "--gpu", "h100-80gb", "--output", "json"]) == 0
    sized = json.loads(capsys.readouterr().out)
    assert sized["gpu"] == "h100-80gb" and sized["micro_batch"] == 1 and sized["method"] == "qlora"


def test_the_api_keys_file_is_the_specs_locally_and_the_mounted_secret_on_kubernetes():
    auth = {"enabled": True, "api_keys_file": "~/keys.txt"}
    assert resolve(sv(auth=auth), Facts())["api_keys_file"] == "~/keys.txt"
    on_k8s = resolve(sv(auth=auth), Facts(target="k8s"))  # what `platformctl spec resolve --target k8s` shows
    assert on_k8s["api_keys_file"] == "/etc/llm-platform/api-keys/keys" and on_k8s.source("api_keys_file") == "target"
    assert "~/keys.txt is not in the pods" in on_k8s.values["api_keys_file"].reason
    assert resolve(sv(), Facts(target="k8s"))["api_keys_file"] is None  # auth off: no file, nothing mounted
    assert resolve(sv(auth={"enabled": True}), Facts())["api_keys_file"] is None  # keys from $PLATFORM_API_KEYS only


def test_serving_pods_are_a_resolved_value_the_operator_reads():
    """A 70B replica over 8 GPUs on nodes of 4 is two pods of 4 GPUs each; the operator's worker group
    is exactly that, not a second calculation of its own."""
    from llmoperator.reconcile.common import OperatorConfig
    from llmoperator.reconcile.deployment import cluster_config

    spec = sv(model={"base": "llama2-70b-chat"}, tensor_parallel=8, resources={"gpus_per_shard": 1, "cpus_per_shard": 2},
              autoscaling={"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1})
    plan = resolve(spec, Facts(target="k8s", gpus_per_node=4)).require()
    assert plan["pods"] == {"pods_per_replica": 2, "gpus_per_pod": 4, "shards_per_pod": 4, "cpus_per_pod": 9, "memory_gb_per_pod": 96.0}
    group = cluster_config(plan, OperatorConfig())["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (group["replicas"], group["maxReplicas"], limits["nvidia.com/gpu"], limits["cpu"], limits["memory"]) == (2, 4, 4, "9", "96Gi")
    cpu = resolve(sv(model={"base": "llama2-tiny"}), Facts(target="k8s")).require()
    assert cpu["pods"] == {"pods_per_replica": 1, "gpus_per_pod": 0, "shards_per_pod": 1, "cpus_per_pod": 2, "memory_gb_per_pod": 8.0}


def test_the_cli_preview_for_k8s_names_the_pods_checkpoint_home_as_the_operator_does():
    from llmplatform.backends.facts import finetune_facts
    from llmplatform.backends.k8s import finetune_job_cr
    from llmoperator.reconcile.common import OperatorConfig
    from llmoperator.reconcile.finetune import plan_for

    spec = ft(base_model="llama2-tiny")
    preview = resolve(spec, finetune_facts(spec, "k8s"))
    operator = plan_for(finetune_job_cr(spec, "team-a"), OperatorConfig())
    assert preview["checkpoint_storage"] == operator["checkpoint_storage"] == "/home/ray/.llm-platform/checkpoints"
