"""`llama2-tiny`: a Llama 2 architecture model and tokenizer generated locally and cached.

Nothing can be downloaded in tests or on a laptop demo, so the platform builds its own small
Llama: `ensure_tiny_model("random")` (seeded random init, seconds) or `ensure_tiny_model("base")`
(briefly pretrained on plain text so LoRA can learn tasks on a CPU). A spec names it by
`llama2-tiny`; `llmplatform.basemodels.locate(name)` maps that to the cached checkpoint.
`llmplatform.tiny.tasks` makes the synthetic instruction datasets with held-out splits.
"""

from llmplatform.tiny.cache import ensure_tiny_model, generate_all

__all__ = ["ensure_tiny_model", "generate_all"]
