"""A Llama checkpoint (a transformers model in memory) as one GGUF file for llama.cpp.

Tensor names and metadata follow llama.cpp's `llama` architecture (what its convert_hf_to_gguf.py
writes): `token_embd`, `blk.N.attn_{q,k,v,output}`, `blk.N.ffn_{gate,up,down}`, `blk.N.{attn,ffn}_norm`,
`output_norm`, `output`. The q and k projections are permuted from Hugging Face's rotary layout
(halves) to llama.cpp's (interleaved pairs). Norms stay float32; the matrices are bf16, f16 or q8_0
(q8_0 falls back to f16 for a matrix whose rows are not a multiple of its 32-value block).
The vocabulary comes from the tokenizer's SentencePiece model (pieces, scores, token types).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FORMATS = ("bf16", "f16", "q8_0")
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; KeyError for a tensor llama.cpp has no slot for."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"] or parts[-1] != "weight":
        raise KeyError(hf_name)
    return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:-1])]}.weight"


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's q/k rows (per head: first half, second half of the rotary pairs) in llama.cpp's order."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _vocab(tokenizer_dir: Path) -> tuple[list[bytes], list[float], list[int]]:
    import sentencepiece as spm

    from gguf import TokenType

    model = tokenizer_dir / "tokenizer.model"
    if not model.is_file():
        raise FileNotFoundError(f"{model}: GGUF export needs the base's SentencePiece tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
    return tokens, scores, types


def write_gguf(model, tokenizer_dir: str | Path, out_file: str | Path, fmt: str = "bf16", name: str = "model") -> dict:
    """Write `model` (a transformers Llama) and the tokenizer in `tokenizer_dir` to `out_file`;
    returns {tensor name: (ggml type, numpy shape)}."""
    import gguf

    if fmt not in FORMATS:
        raise ValueError(f"GGUF format {fmt!r}: use one of {', '.join(FORMATS)}")
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"GGUF export writes llama.cpp's llama architecture; this model is {getattr(cfg, 'model_type', None)!r}")
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[fmt]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(out_file), arch="llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[fmt])
    tokenizer_dir = Path(tokenizer_dir)
    tokens, scores, types = _vocab(tokenizer_dir)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if getattr(cfg, key, None) is not None:
            add(int(getattr(cfg, key)))
    template = tokenizer_dir / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())
    written = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = rope_permute(data, cfg.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = rope_permute(data, cfg.num_key_value_heads)
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qtype
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = gguf.GGMLQuantizationType.F16
        stored = gguf.quants.quantize(data, kind)  # bytes (uint8) for packed types; the writer derives the shape from them
        writer.add_tensor(gguf_name(hf_name), stored, raw_dtype=kind)
        written[gguf_name(hf_name)] = (kind.name, tuple(data.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
