"""`llama2-tiny`: a Llama 2 architecture model and tokenizer generated locally and cached.

Nothing can be downloaded in tests or on a laptop demo, so the platform builds its own small
Llama: `ensure_tiny_model("random")` (seeded random init, seconds) or `ensure_tiny_model("base")`
(briefly pretrained on plain text so LoRA can learn tasks on a CPU). `resolve_base(name)` maps
a model name from a spec to what transformers should load. `llmplatform.tiny.tasks` makes the
synthetic instruction datasets with held-out splits.
"""

from llmplatform.tiny.cache import ensure_tiny_model, generate_all
from llmplatform.tiny.resolve import resolve_base

__all__ = ["ensure_tiny_model", "generate_all", "resolve_base"]
