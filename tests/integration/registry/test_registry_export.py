"""`platformctl models export`: merged safetensors, GGUF and the adapter folder, from a registered version.

The base is the real llama2-tiny-random checkpoint (with its SentencePiece tokenizer) and the adapter a
real peft LoRA with non-zero weights, registered on the session's MLflow server with that base in its lineage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmplatform.cli.main import main

pytestmark = pytest.mark.integration
BASE = "llama2-tiny-random"


@pytest.fixture(scope="module")
def tiny_base() -> Path:
    from llmplatform import basemodels

    return Path(basemodels.locate(BASE))


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # visibly changes greedy output
    out = tmp_path_factory.mktemp("export-adapter") / "adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def version(reg, adapter, tiny_base) -> int:
    from llmplatform.registry import register_adapter

    return register_adapter(reg.uri, reg.name, adapter, reg.run(eval_loss=1.0), reg.lineage(base_model=BASE), base_model_dir=tiny_base)


def greedy(model, prompts: list[list[int]], n: int = 8) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def test_merged_export_generates_what_base_plus_adapter_does_and_is_recorded_on_the_version(reg, version, adapter, tiny_base, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code = main(["models", "export", f"{reg.name}/{version}", "--format", "merged", "--dtype", "float32", "--out", str(out),
                 "--tracking-uri", reg.uri, "--output", "json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["version"] == version and record["base_model"] == BASE
    assert {"model.safetensors", "config.json", "tokenizer.model", "export.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "export.json").read_text())["adapter_sha256"] == record["adapter_sha256"]

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 1000, size=int(rng.integers(4, 12))).tolist() for _ in range(20)]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base_only = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    expected = greedy(reference, prompts)
    assert greedy(merged, prompts) == expected
    assert greedy(base_only, prompts) != expected  # the adapter was folded in, not dropped
    assert AutoTokenizer.from_pretrained(str(out)).vocab_size == merged.config.vocab_size

    tags = reg.client.get_model_version(reg.name, str(version)).tags
    tag = json.loads(tags["export.merged"])
    assert tag["artifact"].startswith("runs:/") and tag["files"] == record["files"]
    run_id, path = tag["artifact"][len("runs:/"):].split("/", 1)
    assert "model.safetensors" in {Path(f.path).name for f in reg.client.list_artifacts(run_id, path)}


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
def test_gguf_export_reads_back_with_llama_names_shapes_metadata_and_the_merged_weights(reg, version, adapter, tiny_base, tmp_path, gguf_type):
    import gguf

    from llmplatform.export.gguf import gguf_name, rope_permute
    from llmplatform.export.merge import merged_model
    from llmplatform.registry.export import export

    record = export(reg.uri, f"models:/{reg.name}/{version}", "gguf", tmp_path / "gguf", gguf_type=gguf_type, register=False)
    [file] = [f for f in record["files"] if f.endswith(".gguf")]
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / file))
    merged = merged_model(tiny_base, adapter, "float32")
    cfg, state = merged.config, merged.state_dict()
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {gguf_name(n) for n in state}
    for hf_name, value in state.items():
        t = tensors[gguf_name(hf_name)]
        assert [int(d) for d in t.shape] == list(reversed(value.shape))  # GGUF lists dims fastest first
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "llama.block_count", "llama.embedding_length",
                                                        "llama.attention.head_count", "llama.attention.head_count_kv", "tokenizer.ggml.model")}
    assert fields == {"general.architecture": "llama", "llama.block_count": cfg.num_hidden_layers, "llama.embedding_length": cfg.hidden_size,
                      "llama.attention.head_count": cfg.num_attention_heads, "llama.attention.head_count_kv": cfg.num_key_value_heads,
                      "tokenizer.ggml.model": "llama"}
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == cfg.vocab_size
    q = tensors["blk.1.attn_q.weight"]
    stored = gguf.quants.dequantize(q.data, q.tensor_type).reshape(state["model.layers.1.self_attn.q_proj.weight"].shape)
    want = rope_permute(state["model.layers.1.self_attn.q_proj.weight"].numpy(), cfg.num_attention_heads)
    assert q.tensor_type.name == gguf_type.upper()
    assert np.abs(stored - want).max() <= 0.01 * np.abs(want).max()  # bf16 / q8_0 rounding of the merged weights
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_adapter_export_and_refusals_that_write_nothing(reg, version, adapter, tmp_path, capsys):
    from llmplatform.errors import RegistryError
    from llmplatform.registry.export import export

    record = export(reg.uri, f"models:/{reg.name}/{version}", "adapter", tmp_path / "a", register=False)
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    assert record["artifact"] is None and "export.adapter" not in reg.client.get_model_version(reg.name, str(version)).tags

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(RegistryError, match="not an empty folder"):
        export(reg.uri, f"models:/{reg.name}/{version}", "merged", taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    code = main(["models", "export", f"{reg.name}/{version}", "--format", "onnx", "--out", str(tmp_path / "x"), "--tracking-uri", reg.uri])
    assert code != 0 and "--format 'onnx'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".*export-*"))  # no staging folder left behind
