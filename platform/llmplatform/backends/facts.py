"""What the CLI knows about a target before resolving a spec (the I/O half of `resolve`).

`finetune_facts` and `serve_facts` gather the facts `llmplatform.resolve` needs: the GPU type
given on the command line, the connected Ray cluster's accelerators, whether vLLM is installed,
the registry versions (metadata only) behind each `models:/` reference, the LoRA rank of listed
local adapters, and where the target keeps checkpoints. A registry that can't be reached is a
fact too: the resolve step reports it with the reference it blocked.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmplatform import paths
from llmplatform.errors import PlatformError
from llmplatform.resolve import Facts, RegistryFact
from llmplatform.specs import REGISTRY_URI, FineTuneSpec, ServeSpec


def finetune_facts(spec: FineTuneSpec, target: str, gpu_type: str | None = None) -> Facts:
    """Facts for a fine-tuning spec: local jobs keep checkpoints under this PLATFORM_HOME."""
    home = str(paths.platform_home()) if target == "local" else None
    return Facts(target=target, gpu_type=gpu_type, platform_home=home)


def registry_refs(spec: ServeSpec) -> list[str]:
    refs = [spec.model.registry] + [a.source for a in spec.model.adapters]
    return [r for i, r in enumerate(refs) if r and REGISTRY_URI.match(r) and r not in refs[:i]]


def lookup_refs(refs: list[str], tracking_uri: str | None) -> tuple[dict[str, RegistryFact], dict[str, str]]:
    """(facts, errors) for each registry reference, metadata only."""
    found, errors = {}, {}
    if not refs:
        return found, errors
    from llmplatform import registry

    for ref in refs:
        try:
            found[ref] = RegistryFact(**registry.lookup(tracking_uri, ref))
        except PlatformError as exc:
            errors[ref] = str(exc)
        except Exception as exc:  # MLflow unreachable or refusing: the resolve step names the reference
            errors[ref] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return found, errors


def adapter_ranks(spec: ServeSpec) -> dict[str, int]:
    """LoRA rank (`r` of adapter_config.json) of each listed local adapter directory."""
    ranks = {}
    for a in spec.model.adapters:
        config = Path(a.source).expanduser() / "adapter_config.json"
        if REGISTRY_URI.match(a.source) or not config.is_file():
            continue
        try:
            r = json.loads(config.read_text()).get("r")
        except (OSError, ValueError):
            continue
        if isinstance(r, int):
            ranks[a.name] = r
    return ranks


def serve_facts(spec: ServeSpec, target: str, *, gpu_type: str | None = None, cluster: tuple[int | None, int | None] = (None, None),
                vllm_available: bool | None = None) -> Facts:
    """Facts for a serve spec. `cluster`: (accelerators on the biggest node, in all) of the
    connected Ray cluster, when one is; `vllm_available` defaults to this environment's."""
    if vllm_available is None:
        from llmplatform.serving.engines import vllm_usable

        vllm_available = vllm_usable()[0]
    found, errors = lookup_refs(registry_refs(spec), spec.tracking_uri)
    return Facts(target=target, gpu_type=gpu_type, gpus_per_node=cluster[0], accelerators=cluster[1], vllm_available=vllm_available,
                 registry=found, registry_errors=errors, adapter_ranks=adapter_ranks(spec))
