"""Spec + target facts -> the resolved plan: the ONLY caller of the planner (pure, no I/O).

`resolve(spec, facts)` returns a `Resolved` document for a FineTuneSpec or a ServeSpec. Each face
calls it once (the CLI at submit/deploy, the operator at reconcile) and the document travels with
the work; training workers and Serve replicas read it and never re-derive a value. `size_training`,
`size_serving` and `sizing_table` are the planner's answers for quick questions (`platformctl
plan --model ... --gpu ...`, the docs' sizing tables), so nothing else imports the planner.
"""

from __future__ import annotations

from llmplatform.resolve.document import API_VERSION, Derived, Facts, RegistryFact, Resolved, ResolveError
from llmplatform.resolve.finetune import K8S_PLATFORM_HOME, resolve_finetune
from llmplatform.resolve.serve import K8S_API_KEYS_FILE, VLLM_LORA_RANKS, pinned, resolve_serve, served_spec
from llmplatform.resolve.sweep import sweep_pods
from llmplatform.specs import FineTuneSpec, ServeSpec, StrictModel


def resolve(spec: StrictModel, facts: Facts | None = None) -> Resolved:
    """The resolved plan of a fine-tune or serve spec (problems in `.problems`; `.require()` raises)."""
    if isinstance(spec, FineTuneSpec):
        return resolve_finetune(spec, facts)
    if isinstance(spec, ServeSpec):
        return resolve_serve(spec, facts)
    raise TypeError(f"not a spec: {type(spec).__name__}")


def size_training(*args, **kwargs):
    """`planner.plan_training` for a quick question (model, method, GPU) without a spec."""
    from llmplatform import planner

    return planner.plan_training(*args, **kwargs)


def size_serving(*args, **kwargs):
    """`planner.plan_serving` for a quick question (model, GPU) without a spec."""
    from llmplatform import planner

    return planner.plan_serving(*args, **kwargs)


def sizing_table(*args, **kwargs):
    from llmplatform import planner

    return planner.sizing_table(*args, **kwargs)


__all__ = ["API_VERSION", "Derived", "Facts", "K8S_API_KEYS_FILE", "K8S_PLATFORM_HOME", "RegistryFact", "ResolveError", "Resolved", "VLLM_LORA_RANKS", "pinned", "resolve",
           "resolve_finetune", "resolve_serve", "served_spec", "size_serving", "size_training", "sizing_table", "sweep_pods"]
