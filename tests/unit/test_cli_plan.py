"""`platformctl plan` as a user runs it: table and JSON output, exit codes, error messages."""

from __future__ import annotations

import json

import pytest

from llmplatform.catalog import CATALOG
from llmplatform.cli.main import main
from llmplatform.gpus import GPUS
from llmplatform.planner import plan_serving, plan_training


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_qlora_table_shows_breakdown_and_placement(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "llama2-70b", "--method", "qlora", "--gpu", "a100-80gb")
    assert code == 0
    for word in ("weights", "adapter", "optimizer", "activations", "overhead", "total", "KV cache", "MiB/token", "8x"):
        assert word in out
    plan = plan_training("llama2-70b", "qlora", "a100-80gb")
    assert f"{plan.total_gib:.2f}" in out
    assert "tensor parallel 1" in out and "FSDP no" in out and "STRICT_PACK" in out
    assert '{"GPU": 1, "CPU": 4.0}' in out and "verdict:    fits" in out


def test_json_output_is_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "llama2-7b", "--method", "lora", "--gpu", "l4-24gb", "--seq-len", "1024", "--micro-batch", "2", "-o", "json")
    assert code == 0
    data = json.loads(out)
    expected = plan_training("llama2-7b", "lora", "l4-24gb", seq_len=1024, micro_batch=2).to_dict()
    assert data == json.loads(json.dumps(expected))
    assert data["kind"] == "training" and data["seq_len"] == 1024 and data["micro_batch"] == 2


def test_serve_plan_for_70b_uses_two_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "llama2-70b", "--serve", "--gpu", "a100-80gb", "--dtype", "float16", "--output", "json")
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "serving" and data["dtype"] == "float16"
    assert data["placement"]["tensor_parallel"] == 2 and len(data["placement"]["bundles"]) == 2
    assert data["placement"]["strategy"] == "STRICT_PACK"
    assert data["kv_cache"]["gqa_reduction"] == 8
    code, out, _ = run(capsys, "--model", "llama2-70b", "--serve", "--gpu", "a100-80gb")
    assert code == 0 and "tensor parallel 2" in out and "2 x {" in out and "concurrent full-length sequences" in out


def test_plan_that_does_not_fit_still_prints_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "llama2-7b", "--method", "full", "--gpu", "t4-16gb", "--seq-len", "4096", "--micro-batch", "16")
    assert code == 1 and "DOES NOT FIT" in out and "--seq-len" in out
    code, out, _ = run(capsys, "--model", "llama2-7b", "--method", "full", "--gpu", "t4-16gb", "--seq-len", "4096", "--micro-batch", "16", "-o", "json")
    assert code == 1 and json.loads(out)["fits"] is False


def test_unknown_model_lists_accepted_values(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--model", "llama3-8b", "--gpu", "a100-80gb")
    assert code == 1 and out == ""
    assert "llama3-8b" in err and all(name in err for name in CATALOG)


def test_unknown_gpu_lists_accepted_values(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--model", "llama2-7b", "--gpu", "b200")
    assert code == 1 and "b200" in err and all(name in err for name in GPUS)


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["--method", "dpo"], "lora, qlora, full"),
        (["--serve", "--method", "lora"], "drop --serve"),
        (["--dtype", "float16"], "add --serve"),
        (["--serve", "--dtype", "fp64"], "bfloat16"),
        (["--seq-len", "9000"], "4096"),
    ],
)
def test_bad_flag_combinations_name_the_fix(capsys: pytest.CaptureFixture[str], args: list[str], hint: str) -> None:
    code, out, err = run(capsys, "--model", "llama2-7b", "--gpu", "a100-80gb", *args)
    assert code == 1 and out == "" and hint in err


def test_missing_required_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--model", "llama2-7b")
    assert code == 2 and "--gpu" in err


def test_gpus_per_node_changes_the_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "llama2-70b", "--serve", "--gpu", "a100-80gb", "--gpus-per-node", "1", "-o", "json")
    data = json.loads(out)
    assert code == 0 and data["placement"]["strategy"] == "PACK" and data["placement"]["nodes"] == 2
    assert data["placement"] == json.loads(json.dumps(plan_serving("llama2-70b", "a100-80gb").to_dict()["placement"])) | {"strategy": "PACK", "nodes": 2}
