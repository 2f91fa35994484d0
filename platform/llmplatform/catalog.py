"""The Llama 2 model family as one data table, plus the small shapes tests and benchmarks use.

Shapes follow the Llama 2 paper (Touvron et al. 2023, Table 1 and section 2.2) and Meta's
Hugging Face configs: vocab 32000, context 4096, SwiGLU FFN, RMSNorm, untied embeddings, GQA
with 8 KV heads on 70B (and on the 34B, which was trained but withheld; its shape is Code
Llama 34B's). Parameter counts are computed from the shape, not typed in. `llama2-tiny` is the
locally generated test model; `llama2-serve-bench` is the standard serving-benchmark shape
(STACK-NOTES); `llama1-65b` is kept as a reference shape because the QLoRA paper's 65B
figures were measured on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmplatform.errors import PlatformError


class UnknownModelError(PlatformError):
    """A model name that is not in the catalog; the message lists the known names."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture model: everything the planner and config builders need."""

    name: str
    hf_id: str | None  # Hugging Face repo id, None for locally generated models
    layers: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads: MHA; fewer: GQA)
    hidden: int
    ffn: int  # SwiGLU intermediate size
    vocab: int = 32000
    context: int = 4096
    chat: bool = False
    rms_norm_eps: float = 1e-5
    params_b: float | None = field(default=None, compare=False)  # filled from the shape

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: hidden must divide by heads and heads by kv_heads")
        if self.params_b is None:
            object.__setattr__(self, "params_b", round(self.params / 1e9, 3))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token: kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the untied output head."""
        return 2 * self.vocab * self.hidden

    @property
    def layer_linear_params(self) -> int:
        """Weights of one decoder layer's seven linear layers (q k v o gate up down)."""
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim  # q,o + k,v
        mlp = 3 * self.hidden * self.ffn  # gate, up, down
        return attention + mlp

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden  # + two RMSNorm weights

    @property
    def params(self) -> int:
        """Total parameter count from the shape (embeddings, layers, final norm, lm_head)."""
        return self.embedding_params + self.layers * self.layer_params + self.hidden


def _llama2(size: str, layers: int, heads: int, kv_heads: int, hidden: int, ffn: int, chat_too: bool) -> list[ModelShape]:
    """The base model of one size and, where Meta released it, its -chat variant."""
    base = f"meta-llama/Llama-2-{size}"
    shapes = [ModelShape(f"llama2-{size}", f"{base}-hf" if chat_too else None, layers, heads, kv_heads, hidden, ffn)]
    if chat_too:
        shapes.append(ModelShape(f"llama2-{size}-chat", f"{base}-chat-hf", layers, heads, kv_heads, hidden, ffn, chat=True))
    return shapes


_ROWS: list[ModelShape] = [
    #        size    layers heads kv  hidden  ffn    released (so: HF id and chat variant)
    *_llama2("7b", 32, 32, 32, 4096, 11008, True),
    *_llama2("13b", 40, 40, 40, 5120, 13824, True),
    *_llama2("34b", 48, 64, 8, 8192, 22016, False),  # withheld: no weights, shape only
    *_llama2("70b", 80, 64, 8, 8192, 28672, True),
    ModelShape("llama2-tiny", None, 4, 4, 2, 256, 768, vocab=1024, context=1024),
    ModelShape("llama2-serve-bench", None, 8, 8, 8, 512, 1376),
]
CATALOG: dict[str, ModelShape] = {m.name: m for m in _ROWS}

# Not Llama 2: the shape the QLoRA paper's 65B numbers refer to (LLaMA 1, MHA, 2048 context).
REFERENCE_MODELS: dict[str, ModelShape] = {
    "llama1-65b": ModelShape("llama1-65b", "huggyllama/llama-65b", 80, 64, 64, 8192, 22016, context=2048, rms_norm_eps=1e-6),
}


def known_models() -> list[str]:
    return [*CATALOG, *REFERENCE_MODELS]


def get_model(name: str | ModelShape) -> ModelShape:
    """A catalog shape by name (`llama2-7b`, case-insensitive) or by Hugging Face id."""
    if isinstance(name, ModelShape):
        return name
    key = name.strip().lower()
    table = {**CATALOG, **REFERENCE_MODELS}
    if key in table:
        return table[key]
    for shape in table.values():
        if shape.hf_id and shape.hf_id.lower() == key:
            return shape
    raise UnknownModelError(f"unknown model {name!r}; accepted: {', '.join(known_models())} (or their Hugging Face ids)")


def to_hf_config(shape: ModelShape | str) -> dict[str, Any]:
    """`transformers.LlamaConfig(**to_hf_config(shape))` builds this model's config."""
    shape = get_model(shape)
    return {
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }


def from_hf_config(config: dict[str, Any], name: str = "custom") -> ModelShape:
    """The shape of a Llama checkpoint from its config.json contents (to plan or compare it)."""
    try:
        heads = config["num_attention_heads"]
        return ModelShape(
            name=name,
            hf_id=config.get("_name_or_path") or None,
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            hidden=config["hidden_size"],
            ffn=config["intermediate_size"],
            vocab=config["vocab_size"],
            context=config.get("max_position_embeddings", 4096),
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        )
    except KeyError as exc:
        raise UnknownModelError(f"{name}: config has no {exc.args[0]!r}; is it a Llama config.json?") from exc
