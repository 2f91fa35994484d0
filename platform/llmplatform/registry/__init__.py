"""The model registry: LoRA adapters as MLflow model versions, promoted with aliases.

Public API (training and serving call these): `register_adapter`, `resolve` (+ `ResolvedAdapter`),
`promote`, `rollback` (+ `PromotionRecord`, `PromotionRefused`), `list_models`, `show_model`,
`check_compatibility`, `parse_ref`. MLflow itself is imported only when a function runs.
"""

from llmplatform.registry.compat import check_compatibility, compatibility_facts
from llmplatform.registry.history import PromotionRecord
from llmplatform.registry.listing import list_models, show_model
from llmplatform.registry.promote import PromotionRefused, promote, rollback
from llmplatform.registry.refs import ModelRef, parse_ref
from llmplatform.registry.register import register_adapter
from llmplatform.registry.resolve import ResolvedAdapter, lookup, resolve

__all__ = [
    "ModelRef", "PromotionRecord", "PromotionRefused", "ResolvedAdapter", "check_compatibility", "compatibility_facts",
    "list_models", "lookup", "parse_ref", "promote", "register_adapter", "resolve", "rollback", "show_model",
]
