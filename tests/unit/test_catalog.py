"""The Llama 2 catalog against the paper's table and against transformers' own parameter count."""

from __future__ import annotations

import pytest

from llmplatform import catalog
from llmplatform.catalog import CATALOG, ModelShape, UnknownModelError, from_hf_config, get_model, to_hf_config
from llmplatform.errors import PlatformError

# Llama 2 paper (Touvron et al. 2023) Table 1 / section 2.2 and Meta's released configs:
# size: (layers, heads, kv_heads, hidden, ffn). 34B was withheld; its shape is Code Llama 34B's.
PAPER = {
    "7b": (32, 32, 32, 4096, 11008),
    "13b": (40, 40, 40, 5120, 13824),
    "34b": (48, 64, 8, 8192, 22016),
    "70b": (80, 64, 8, 8192, 28672),
}
# Published sizes in billions (the paper's "7B/13B/34B/70B" rounded; exact counts from the shape).
PARAMS_B = {"7b": (6.7, 6.8), "13b": (12.9, 13.1), "34b": (33.6, 33.8), "70b": (68.9, 69.1)}
RELEASED = {"7b", "13b", "70b"}


def llama2_names() -> list[str]:
    return [n for n in CATALOG if n.startswith("llama2-") and n.split("-")[1] in PAPER]


@pytest.mark.parametrize("name", llama2_names())
def test_shape_matches_paper_table(name: str) -> None:
    m = get_model(name)
    size = name.split("-")[1]
    assert (m.layers, m.heads, m.kv_heads, m.hidden, m.ffn) == PAPER[size]
    assert (m.vocab, m.context, m.head_dim) == (32000, 4096, 128)
    low, high = PARAMS_B[size]
    assert low <= m.params / 1e9 <= high
    assert m.params_b == pytest.approx(m.params / 1e9, abs=1e-3)
    assert m.chat == name.endswith("-chat")


def test_family_has_base_and_chat_variants_with_hf_ids() -> None:
    for size in RELEASED:
        assert get_model(f"llama2-{size}").hf_id == f"meta-llama/Llama-2-{size}-hf"
        assert get_model(f"llama2-{size}-chat").hf_id == f"meta-llama/Llama-2-{size}-chat-hf"
    assert get_model("llama2-34b").hf_id is None  # withheld: no weights to download
    assert "llama2-34b-chat" not in CATALOG


def test_gqa_only_on_34b_and_70b() -> None:
    gqa = {n for n in llama2_names() if get_model(n).kv_heads < get_model(n).heads}
    assert gqa == {"llama2-34b", "llama2-70b", "llama2-70b-chat"}


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-34b", "llama2-70b", "llama2-tiny", "llama2-serve-bench", "llama1-65b"])
def test_param_count_equals_transformers_model(name: str) -> None:
    """Our formula counts what LlamaForCausalLM actually allocates (built on the meta device)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**to_hf_config(name)))
    assert sum(p.numel() for p in model.parameters()) == get_model(name).params
    assert model.config.num_key_value_heads == get_model(name).kv_heads


def test_tiny_and_bench_shapes_match_the_contract() -> None:
    tiny = get_model("llama2-tiny")
    assert (tiny.vocab, tiny.hidden, tiny.ffn, tiny.layers, tiny.heads, tiny.kv_heads, tiny.context) == (1024, 256, 768, 4, 4, 2, 1024)
    assert tiny.hf_id is None
    bench = get_model("llama2-serve-bench")
    assert (bench.vocab, bench.hidden, bench.ffn, bench.layers, bench.heads, bench.kv_heads) == (32000, 512, 1376, 8, 8, 8)
    assert 57e6 < bench.params < 59e6  # STACK-NOTES: "58M parameters"


def test_lookup_by_hf_id_and_case_insensitive() -> None:
    assert get_model("meta-llama/Llama-2-13b-chat-hf").name == "llama2-13b-chat"
    assert get_model(" LLaMA2-70B ").name == "llama2-70b"
    assert get_model(get_model("llama2-7b")) is get_model("llama2-7b")


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model("llama3-8b")
    assert isinstance(info.value, PlatformError)
    for name in ("llama2-7b", "llama2-70b-chat", "llama2-tiny"):
        assert name in str(info.value)


def test_hf_config_round_trip() -> None:
    for name in CATALOG:
        shape = get_model(name)
        back = from_hf_config(to_hf_config(shape), name=name)
        assert (back.layers, back.heads, back.kv_heads, back.hidden, back.ffn, back.vocab, back.context) == (
            shape.layers, shape.heads, shape.kv_heads, shape.hidden, shape.ffn, shape.vocab, shape.context)
    with pytest.raises(UnknownModelError, match="hidden_size"):
        from_hf_config({"num_attention_heads": 4, "num_hidden_layers": 2})


def test_shapes_are_frozen_and_validated() -> None:
    with pytest.raises(Exception):
        get_model("llama2-7b").layers = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="divide"):
        ModelShape("bad", None, layers=2, heads=3, kv_heads=2, hidden=64, ffn=128)
    assert catalog.known_models()[: len(CATALOG)] == list(CATALOG)
