"""Adapter/base compatibility: does a saved LoRA adapter fit a base model's config?

An adapter trained on another base loads without complaint in many stacks and then produces
garbage. Here the adapter's `adapter_config.json` and the tensor shapes in its weights file are
checked against the base's `config.json`: base model id, architecture, rank, target modules,
layer count, every LoRA matrix's input/output size, and the vocabulary size of any embedding or
`lm_head` the adapter carries (`modules_to_save`). `check_compatibility` returns every problem at
once (empty list = fits); `compatibility_facts` gives the facts registration records as tags.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from llmplatform.basemodels import identity
ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Module names of the Llama-2 family (the architectures this platform fine-tunes and serves).
LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"}
ARCH_MODULES = {"llama": LLAMA_MODULES, "mistral": LLAMA_MODULES}
# peft key: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight -> layer 3, q_proj, A
LORA_KEY = re.compile(r"(?P<module>\w+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.\w+)?(?:\.weight)?$")
LAYER_KEY = re.compile(r"\blayers\.(\d+)\.")
FULL_KEY = re.compile(r"(?P<module>embed_tokens|lm_head)(?:\.modules_to_save\.\w+)?\.weight$")


def load_base_config(base: Any) -> dict:
    """A base model's config as a dict, from a dict, a directory/`config.json` path, or a catalog ModelShape."""
    if isinstance(base, dict):
        return dict(base)
    if isinstance(base, (str, Path)):
        path = Path(base).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"base model config not found at {path}; pass the base model directory")
        return json.loads(path.read_text())
    if hasattr(base, "vocab") and hasattr(base, "hidden"):  # llmplatform.catalog.ModelShape
        return {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "_name_or_path": getattr(base, "hf_id", "") or base.name,
            "hidden_size": base.hidden, "intermediate_size": base.ffn, "num_hidden_layers": base.layers,
            "num_attention_heads": base.heads, "num_key_value_heads": base.kv_heads, "vocab_size": base.vocab,
        }
    raise TypeError(f"base config must be a dict, a directory or a ModelShape, not {type(base).__name__}")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    return json.loads(path.read_text())


def check_compatibility(adapter_dir: str | Path, base_config: Any, base_model: str | None = None) -> list[str]:
    """Every reason the adapter in `adapter_dir` does not fit `base_config`; [] when it fits.

    `base_config` is the base's config.json as a dict (or its directory, or a catalog ModelShape);
    `base_model` is the base id the caller expects (e.g. lineage `base_model`), compared with the
    adapter's `base_model_name_or_path`. With `base_config=None` only the adapter's own
    consistency is checked (config vs weight shapes).
    """
    adapter_dir = Path(adapter_dir)
    problems: list[str] = []
    try:
        cfg = read_adapter_config(adapter_dir)
    except FileNotFoundError:
        return [f"{adapter_dir}: no {ADAPTER_CONFIG}; save the adapter with peft `model.save_pretrained(dir)`"]
    except ValueError as exc:
        return [f"{adapter_dir / ADAPTER_CONFIG}: not valid JSON ({exc})"]
    base = load_base_config(base_config) if base_config is not None else {}
    problems += _check_identity(cfg, base, base_model)
    problems += _check_architecture(cfg, base)
    weights = _weight_shapes(adapter_dir)
    if weights is None:
        problems.append(f"{adapter_dir}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
        return problems
    problems += _check_weights(cfg, base, weights)
    return problems


def compatibility_facts(adapter_dir: str | Path, base_config: Any | None) -> dict[str, Any]:
    """What registration records about the adapter and the base it was checked against."""
    cfg = read_adapter_config(adapter_dir)
    facts: dict[str, Any] = {
        "peft_type": cfg.get("peft_type"), "task_type": cfg.get("task_type"),
        "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "lora_dropout": cfg.get("lora_dropout"),
        "target_modules": _as_list(cfg.get("target_modules")), "modules_to_save": _as_list(cfg.get("modules_to_save")),
        "adapter_base_model": cfg.get("base_model_name_or_path"), "use_dora": cfg.get("use_dora", False),
        "checked_against_base": base_config is not None,
    }
    if base_config is not None:
        base = load_base_config(base_config)
        facts.update({
            "model_type": base.get("model_type"), "architectures": base.get("architectures"),
            "hidden_size": base.get("hidden_size"), "num_hidden_layers": base.get("num_hidden_layers"),
            "vocab_size": base.get("vocab_size"), "base_config_sha256": base_config_sha256(base),
        })
    return facts


def base_config_sha256(base: dict) -> str:
    """A hash of the shape-defining base config fields (serving compares it to its own base)."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size")
    shape = {k: base.get(k) for k in keys}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def _as_list(value: Any) -> list | str | None:
    if value is None or isinstance(value, str):
        return value
    return sorted(value)


def base_identity(name: str) -> str:
    """What a base id points at, without building or downloading anything: an existing
    directory (resolved), the tiny model's cache directory, a catalog name's HF id, else itself."""
    return identity(name).rstrip("/")


def _same_base(adapter_id: str, wanted: str) -> bool:
    """Same base: equal ids, or the same directory / catalog entry after `base_identity`."""
    return adapter_id.rstrip("/") == wanted.rstrip("/") or base_identity(adapter_id) == base_identity(wanted)


def _check_identity(cfg: dict, base: dict, base_model: str | None) -> list[str]:
    adapter_id = cfg.get("base_model_name_or_path")
    wanted = [w for w in (base_model, base.get("_name_or_path")) if w]
    if not adapter_id or not wanted:
        return []  # nothing to compare; the shape checks below still run
    if any(_same_base(str(adapter_id), str(w)) for w in wanted):
        return []
    return [f"{ADAPTER_CONFIG} base_model_name_or_path is {adapter_id!r}, but the base model is {wanted[0]!r}; "
            "register the adapter against the base it was trained on"]


def _check_architecture(cfg: dict, base: dict) -> list[str]:
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"{ADAPTER_CONFIG} peft_type is {cfg.get('peft_type')!r}; only LORA adapters are served")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"{ADAPTER_CONFIG} task_type is {cfg.get('task_type')!r}; a causal LM adapter needs CAUSAL_LM")
    model_type = base.get("model_type")
    if not base:
        model_type = "llama"  # no base to compare: check module names against the platform's family
    elif model_type not in ARCH_MODULES:
        problems.append(f"base config model_type is {model_type!r}; supported architectures: {', '.join(sorted(ARCH_MODULES))}")
        return problems
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank <= 0:
        problems.append(f"{ADAPTER_CONFIG} r is {rank!r}; the LoRA rank must be a positive integer")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - ARCH_MODULES[model_type])
        if unknown:
            problems.append(f"{ADAPTER_CONFIG} target_modules {unknown} do not exist in a {model_type} model "
                            f"(its modules: {', '.join(sorted(ARCH_MODULES[model_type]))})")
    return problems


def _weight_shapes(adapter_dir: Path) -> dict[str, list[int]] | None:
    """Tensor name -> shape, read from the weights file's header (no tensor data loaded)."""
    st = adapter_dir / WEIGHT_FILES[0]
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    pt = adapter_dir / WEIGHT_FILES[1]
    if pt.is_file():
        import torch

        state = torch.load(str(pt), map_location="cpu", weights_only=True, mmap=True)
        return {k: list(v.shape) for k, v in state.items()}
    return None


def _expected_dims(base: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Llama module, from the base config."""
    hidden, ffn, vocab = base.get("hidden_size"), base.get("intermediate_size"), base.get("vocab_size")
    heads = base.get("num_attention_heads") or 1
    kv = base.get("num_key_value_heads") or heads
    head_dim = base.get("head_dim") or (hidden // heads if hidden else None)
    q, k = heads * head_dim if head_dim else None, kv * head_dim if head_dim else None
    return {"q_proj": (hidden, q), "k_proj": (hidden, k), "v_proj": (hidden, k), "o_proj": (q, hidden),
            "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden),
            "lm_head": (hidden, vocab), "embed_tokens": (vocab, hidden)}


def _check_weights(cfg: dict, base: dict, weights: dict[str, list[int]]) -> list[str]:
    dims = _expected_dims(base) if base.get("model_type") in ARCH_MODULES else {}
    layers = base.get("num_hidden_layers")
    rank, rank_pattern = cfg.get("r"), cfg.get("rank_pattern") or {}
    targets = cfg.get("target_modules")
    problems, seen = [], set()
    for key, shape in sorted(weights.items()):
        full = FULL_KEY.search(key)
        if full and "lora_" not in key:
            problems += _check_full_module(full.group("module"), shape, base)
            continue
        m = LORA_KEY.search(key)
        if not m:
            continue
        module, which = m.group("module"), m.group("which")
        layer_match = LAYER_KEY.search(key)
        layer = layer_match.group(1) if layer_match else None
        seen.add(module)
        where = f"layers.{layer}.{module}" if layer is not None else module
        if layer is not None and isinstance(layers, int) and int(layer) >= layers:
            problems.append(f"adapter weights reach layer {layer}, but the base has num_hidden_layers={layers}")
        r_here = _rank_for(where, rank, rank_pattern)
        r_dim = shape[0] if which in ("lora_A", "lora_embedding_A") else shape[1]
        if isinstance(r_here, int) and r_dim != r_here:
            problems.append(f"{where}.{which} has rank {r_dim}, but {ADAPTER_CONFIG} says r={r_here}; the adapter files disagree")
        want_in, want_out = dims.get(module, (None, None))
        # A is [r, in] ([r, vocab] for embeddings), B is [out, r] ([hidden, r]): the non-rank side
        outer = shape[1] if which in ("lora_A", "lora_embedding_A") else shape[0]
        want = want_in if which in ("lora_A", "lora_embedding_A") else want_out
        if want is not None and outer != want:
            side = "input" if which.endswith("A") else "output"
            problems.append(f"{where}.{which}: {side} size {outer} does not match the base ({want}); "
                            "the adapter was trained on a different model shape")
    if isinstance(targets, list) and seen - set(targets):
        problems.append(f"adapter weights hold LoRA matrices for {sorted(seen - set(targets))}, "
                        f"which are not in {ADAPTER_CONFIG} target_modules {sorted(targets)}")
    if isinstance(targets, list) and not seen and not weights:
        problems.append("adapter weights file holds no tensors")
    return _dedupe(problems)


def _check_full_module(module: str, shape: list[int], base: dict) -> list[str]:
    """A saved embed_tokens/lm_head (modules_to_save): [vocab, hidden] must match the base."""
    vocab, hidden = base.get("vocab_size"), base.get("hidden_size")
    problems = []
    if vocab is not None and shape[0] != vocab:
        problems.append(f"vocabulary size: the adapter's {module} has {shape[0]} rows, but the base vocab_size is {vocab}; "
                        "the adapter was trained with a different tokenizer")
    if hidden is not None and len(shape) > 1 and shape[1] != hidden:
        problems.append(f"{module}: hidden size {shape[1]} does not match the base hidden_size {hidden}")
    return problems


def _rank_for(where: str, rank: Any, rank_pattern: dict) -> Any:
    for pattern, value in rank_pattern.items():
        if re.search(pattern, where):
            return value
    return rank


def _dedupe(problems: list[str]) -> list[str]:
    """Per-layer repeats of one problem collapse to one line with a count."""
    out: dict[str, int] = {}
    for p in problems:
        key = re.sub(r"layers\.\d+\.", "layers.*.", p)
        out[key] = out.get(key, 0) + 1
    return [p if n == 1 else f"{p} (x{n})" for p, n in out.items()]
