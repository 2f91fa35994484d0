"""The resolved plan of a spec: every derived value with where it came from (pure data).

A `Resolved` document is what `resolve.finetune` / `resolve.serve` return and what travels with
the work: into the Ray job's entrypoint (`--resolved-json`), into the Serve application's args
(serveConfigV2 on Kubernetes) and into MLflow as the run's `resolved.json`. Consumers read values
with `doc["workers"]`; they never plan again. `to_dict`/`from_dict` round-trip through JSON and
refuse a document of another kind or version, so an old pod image can't misread a new plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from llmplatform.errors import Problem, _ProblemsError
from llmplatform.specs import StrictModel, parse_spec

API_VERSION = "llmplatform.io/v1"
DOC_VERSION = 1
KINDS = {"finetune": "ResolvedFineTune", "serve": "ResolvedServe"}
Source = Literal["spec", "planner", "registry", "target", "default"]
SOURCES = ("spec", "planner", "registry", "target", "default")


class ResolveError(_ProblemsError):
    """A spec asks for values the target cannot satisfy; carries every problem at once."""

    noun = "value(s) that cannot be satisfied"


@dataclass(frozen=True)
class Derived:
    """One resolved value: the value (JSON-able), its source, and why (for planner/default values)."""

    value: Any
    source: Source
    reason: str = ""

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source, "reason": self.reason}


@dataclass(frozen=True)
class RegistryFact:
    """What the registry says about one reference, looked up before resolving (metadata only)."""

    ref: str  # models:/NAME@ALIAS or models:/NAME/VERSION
    version: int
    base_model: str | None = None
    lora_rank: int | None = None


@dataclass(frozen=True)
class Facts:
    """What the caller knows about the target. Unknown facts stay None; nothing here does I/O.

    `gpu_type` overrides the spec's (`platformctl spec resolve --gpu-type`); `gpus_per_node` and
    `accelerators` describe a running cluster when one is connected (None: unknown, e.g. Kubernetes,
    where the operator sizes the pods itself); `vllm_available` says whether the target's
    environment (the local venv, or the platform image) has vLLM; `registry` maps each registry
    reference of the spec to what the registry holds; `adapter_ranks` maps local adapter names to
    their LoRA rank; `platform_home` is where the target keeps checkpoints by default;
    `api_keys_file` is the API-key file the target mounts in every Serve pod (the operator's
    Secret volume; on target k8s `K8S_API_KEYS_FILE` when unset), which replaces the spec's
    `auth.api_keys_file` there.
    """

    target: str = "local"
    gpu_type: str | None = None
    gpus_per_node: int | None = None
    accelerators: int | None = None
    vllm_available: bool = False
    registry: Mapping[str, RegistryFact] = field(default_factory=dict)
    registry_errors: Mapping[str, str] = field(default_factory=dict)  # ref -> why the lookup failed
    adapter_ranks: Mapping[str, int] = field(default_factory=dict)
    platform_home: str | None = None
    registry_poll_s: float | None = None  # the operator's override of ServeSpec.registry_poll_s
    api_keys_file: str | None = None  # the keys file the target provides (k8s: the mounted API-key Secret)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("registry", "registry_errors", "adapter_ranks")}
        out["registry"] = {ref: dict(f.__dict__) for ref, f in self.registry.items()}
        out["registry_errors"] = dict(self.registry_errors)
        out["adapter_ranks"] = dict(self.adapter_ranks)
        return out


@dataclass(frozen=True)
class Resolved:
    """A spec with every value derived from it, each with its source; `problems` lists what the
    target cannot satisfy (empty for a plan that can run)."""

    kind: str  # finetune | serve
    spec: StrictModel
    values: dict[str, Derived]
    facts: Facts = field(default_factory=Facts)
    plan: dict | None = None  # the planner's memory breakdown, when the planner ran
    problems: tuple[Problem, ...] = ()

    def __getitem__(self, key: str) -> Any:
        return self.values[key].value

    def source(self, key: str) -> str:
        return self.values[key].source

    def require(self) -> "Resolved":
        """Self, or a ResolveError naming every problem."""
        if self.problems:
            raise ResolveError(f"{self.kind} spec '{self.spec.name}'", list(self.problems))
        return self

    def to_dict(self) -> dict:
        return {
            "apiVersion": API_VERSION, "kind": KINDS[self.kind], "version": DOC_VERSION,
            "spec": self.spec.model_dump(mode="json"),
            "values": {k: v.to_dict() for k, v in self.values.items()},
            "facts": self.facts.to_dict(),
            "plan": self.plan,
            "problems": [p.__dict__ | {"text": p.render()} for p in self.problems],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "resolved plan") -> "Resolved":
        """The document back from JSON; a wrong kind/version or a plan with problems is an error."""
        kinds = {v: k for k, v in KINDS.items()}
        where = []
        if not isinstance(data, Mapping):
            raise ResolveError(source, [Problem("(top level)", "a resolved plan must be a JSON object", type(data).__name__)])
        if data.get("apiVersion") != API_VERSION or data.get("kind") not in kinds:
            where.append(Problem("kind", "not a resolved plan (make one with `platformctl spec resolve`)",
                                 f"{data.get('apiVersion')}/{data.get('kind')}", f"{API_VERSION} {' or '.join(KINDS.values())}"))
        elif data.get("version") != DOC_VERSION:
            where.append(Problem("version", "resolved with another platform version; resolve the spec again", data.get("version"), str(DOC_VERSION)))
        if data.get("problems"):
            where.append(Problem("problems", "this plan has unsatisfiable values and must not run", len(data["problems"])))
        if where:
            raise ResolveError(source, where)
        kind = kinds[data["kind"]]
        spec = parse_spec(kind, data["spec"], f"{source}: spec")
        values = {k: Derived(v["value"], v["source"], v.get("reason", "")) for k, v in data["values"].items()}
        raw = dict(data.get("facts") or {})
        facts = Facts(**{**{k: v for k, v in raw.items() if k not in ("registry",)},
                         "registry": {r: RegistryFact(**f) for r, f in (raw.get("registry") or {}).items()}})
        return cls(kind, spec, values, facts, data.get("plan"))
