"""Registry references: `models:/NAME@ALIAS` and `models:/NAME/VERSION`, parsed into a `ModelRef`.

The grammar is the one specs validate (`llmplatform.specs.REGISTRY_URI`), so a reference a
spec accepts is one the registry resolves.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmplatform.errors import RegistryError
from llmplatform.specs import REGISTRY_URI


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: exactly one of `alias` and `version` is set."""

    name: str
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_ref(ref: str) -> ModelRef:
    """`models:/support-bot@production` -> ModelRef(name, alias); `models:/x/3` -> ModelRef(name, version=3)."""
    match = REGISTRY_URI.match(ref.strip()) if isinstance(ref, str) else None
    if not match:
        raise RegistryError(
            f"model reference {ref!r} is not valid; write models:/NAME@ALIAS (e.g. models:/support-bot@production) "
            "or models:/NAME/VERSION (e.g. models:/support-bot/3)"
        )
    version = match.group("version")
    return ModelRef(name=match.group("name"), alias=match.group("alias"), version=int(version) if version else None)
