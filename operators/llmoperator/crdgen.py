"""Generate our CRDs (FineTuneJob, ModelDeployment, EvaluationJob) from the pydantic specs.

The CRD `spec` schema is the JSON schema of `FineTuneSpec` / `ServeSpec` / `EvaluationSpec` turned into a
Kubernetes *structural* openAPIV3Schema: `$ref`s inlined, `Optional[X]` as `nullable`,
`Literal`s as `enum`, int-or-"auto" as `x-kubernetes-int-or-string`, an `Any` value (a swept
value, a scorer's keyword arguments) as `x-kubernetes-preserve-unknown-fields`, 2020-12 exclusive bounds
as OpenAPI 3.0 booleans, pydantic defaults moved into the description (the API server must not
write defaults the spec didn't have). `name` is dropped: `metadata.name` is the spec name.
Closed pydantic models are closed in Kubernetes by pruning and strict field validation; the API
server rejects a literal `additionalProperties: false`, so the generator does not emit it (the
tests add it when they validate objects). `python -m llmoperator.crdgen manifests/crds` writes
the files; a test fails when the committed ones differ from a fresh render.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from llmplatform.specs import json_schema

from llmoperator.reconcile.status import CONDITION_TYPES

GROUP = "llmplatform.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

KINDS: dict[str, dict[str, Any]] = {
    "FineTuneJob": {"spec_kind": "finetune", "plural": "finetunejobs", "singular": "finetunejob", "short": ["ftj"]},
    "ModelDeployment": {"spec_kind": "serve", "plural": "modeldeployments", "singular": "modeldeployment", "short": ["mdep"]},
    "EvaluationJob": {"spec_kind": "eval", "plural": "evaluationjobs", "singular": "evaluationjob", "short": ["evj"]},
}
JOB_KINDS = ("FineTuneJob", "EvaluationJob")  # run once as a RayJob; their spec is a record of what ran

_DROP = {"title", "default", "examples"}

FINETUNE_PHASES = ["Pending", "Initializing", "Running", "Succeeded", "Failed", "Cancelled"]
DEPLOYMENT_PHASES = ["Pending", "Deploying", "Updating", "Ready", "Unhealthy", "Failed"]


def _describe(node: dict) -> str | None:
    text = node.get("description")
    if "default" in node and node["default"] not in (None, [], {}):
        default = json.dumps(node["default"])
        text = f"{text} Default: {default}." if text else f"Default: {default}."
    return text


def structural(node: dict, defs: dict) -> dict:
    """One pydantic JSON-schema node -> a structural OpenAPI v3 node (recursive, pure)."""
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return structural(merged, defs)
    description = _describe(node)
    if not any(k in node for k in ("type", "anyOf", "const", "enum", "properties")):  # `Any`: any JSON value, kept as given
        return {"x-kubernetes-preserve-unknown-fields": True, **({"description": description} if description else {})}
    any_of = node.get("anyOf")
    if any_of:
        non_null = [b for b in any_of if b.get("type") != "null"]
        nullable = len(non_null) < len(any_of)
        types = {b.get("type") for b in non_null}
        if len(non_null) == 1:
            out = structural({**non_null[0], **({"description": node["description"]} if "description" in node else {})}, defs)
        elif types == {"integer", "string"}:
            out = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
            consts = [b["const"] for b in non_null if "const" in b]
            if consts:
                allowed = " or ".join(repr(c) for c in consts)
                out["x-kubernetes-validations"] = [{"rule": f"type(self) == int || self in {json.dumps(consts)}", "message": f"must be an integer or {allowed}"}]
        else:
            raise ValueError(f"cannot express anyOf {any_of} as a structural schema")
        if nullable:
            out["nullable"] = True
        if description:
            out["description"] = description
        return out
    out: dict[str, Any] = {}
    kind = node.get("type")
    if "const" in node:
        out["enum"] = [node["const"]]
    for key, value in node.items():
        if key in _DROP or key in ("const", "$defs", "anyOf"):
            continue
        if key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out["additionalProperties"] = structural(value, defs)
            elif value is True and "properties" not in node:  # dict[str, Any]: keep every key and value
                out["x-kubernetes-preserve-unknown-fields"] = True
            # `False` (closed model): pruning closes it; the API server forbids the literal.
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "minLength" or key == "maxLength" or key == "minItems" or key == "maxItems":
            out[key] = value
        elif key == "description":
            if description:
                out["description"] = description
        else:
            out[key] = value
    if kind is None and "enum" in out:
        out["type"] = "string"
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    return out


def spec_schema(spec_kind: str) -> dict:
    """The structural schema of a CR's `spec` for a spec kind (no `name`: it is metadata.name)."""
    raw = json_schema(spec_kind)
    schema = structural(raw, raw.get("$defs", {}))
    schema["properties"].pop("name", None)
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    if not schema["required"]:
        schema.pop("required")
    return schema


def _conditions_schema(kind: str) -> dict:
    """`status.conditions`: metav1.Condition, keyed by type (`kubectl wait --for=condition=TYPE`)."""
    s = lambda d, **kw: {"type": "string", "description": d, **kw}  # noqa: E731
    types = ", ".join(CONDITION_TYPES[kind])
    return {
        "type": "array",
        "description": f"Current state as metav1.Conditions, one per type ({types}), always all present; derived from the phase.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "reason", "message", "lastTransitionTime"],
            "properties": {
                "type": s(f"Condition type: {types}.", maxLength=316),
                "status": s("True, False or Unknown.", enum=["True", "False", "Unknown"]),
                "reason": s("Machine-readable CamelCase cause of the last transition.", maxLength=1024, minLength=1),
                "message": s("What happened, in words.", maxLength=32768),
                "lastTransitionTime": s("When status last changed (RFC 3339).", format="date-time"),
                "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0, "description": "metadata.generation the condition reflects."},
            },
        },
    }


def _status_schema(kind: str) -> dict:
    s = lambda d: {"type": "string", "description": d}  # noqa: E731
    common = {
        "phase": {"type": "string", "enum": FINETUNE_PHASES if kind in JOB_KINDS else DEPLOYMENT_PHASES, "description": "Where the object is in its lifecycle."},
        "reason": s("Machine-readable cause of the phase (e.g. DeadlineExceeded, SubmissionFailed, InvalidSpec)."),
        "message": s("What happened last, in words, with the fix where there is one."),
        "observedGeneration": {"type": "integer", "format": "int64", "description": "metadata.generation the status reflects."},
        "lastTransitionTime": s("When the phase last changed (RFC 3339)."),
        "conditions": _conditions_schema(kind),
        "dashboardURL": s("Ray dashboard of the cluster running this object."),
        "rayClusterName": s("The KubeRay RayCluster in use."),
    }
    if kind == "FineTuneJob":
        extra = {
            "rayJobName": s("The KubeRay RayJob created for this job."),
            "rayJobId": s("The Ray job submission id."),
            "mlflowRunId": s("MLflow run tracking this job."),
            "progress": s("Training progress, e.g. `120/500 steps (24%)`."),
            "registeredModel": s("Registered model the trained adapter went to (MLflow registry)."),
            "registeredVersion": s("Registry version of the trained adapter, once the job succeeded."),
            "startTime": s("When the Ray job started (RFC 3339)."),
            "completionTime": s("When the job reached a terminal phase (RFC 3339)."),
        }
    elif kind == "EvaluationJob":
        metrics = {"type": "object", "additionalProperties": {"type": "number"}, "description": "Mean score of each metric (`eval.<dataset>.<metric>`)."}
        extra = {
            "rayJobName": s("The KubeRay RayJob created for this evaluation."),
            "rayJobId": s("The Ray job submission id."),
            "jobId": s("The evaluation's job id, tagged `platform.job_id` on each of its MLflow runs."),
            "results": {"type": "array", "description": "One entry per evaluated model, read from its MLflow run once the job ended.",
                        "items": {"type": "object", "properties": {
                            "model": s("The model as the spec names it."), "runId": s("Its MLflow run."),
                            "status": s("The run's status: FINISHED, or FAILED when a metric raised on every example."),
                            "error": s("Why the model failed, when it did."), "metrics": metrics}}},
            "startTime": s("When the Ray job started (RFC 3339)."),
            "completionTime": s("When the job reached a terminal phase (RFC 3339)."),
        }
    else:
        extra = {
            "rayServiceName": s("The KubeRay RayService serving this deployment."),
            "servedVersion": s("Registry version being served, `NAME/VERSION`, or the base model when no registry reference is set."),
            "resolvedRefs": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Each registry reference (`models:/NAME@ALIAS`) and the version it resolved to."},
            "serviceStatus": s("KubeRay's RayService serviceStatus."),
            "endpoint": s("In-cluster URL of the OpenAI-compatible endpoint."),
        }
    return {"type": "object", "description": f"Observed state of the {kind}, written by the operator.", "properties": {**common, **extra}}


def _printer_columns(kind: str) -> list[dict]:
    cols = [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}]
    if kind == "FineTuneJob":
        cols += [
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.base_model"},
            {"name": "Version", "type": "string", "jsonPath": ".status.registeredVersion"},
            {"name": "RayJob", "type": "string", "jsonPath": ".status.rayJobName", "priority": 1},
            {"name": "MLflow-Run", "type": "string", "jsonPath": ".status.mlflowRunId", "priority": 1},
        ]
    elif kind == "EvaluationJob":
        cols += [
            {"name": "Dataset", "type": "string", "jsonPath": ".spec.dataset.name"},
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
            {"name": "RayJob", "type": "string", "jsonPath": ".status.rayJobName", "priority": 1},
        ]
    else:
        cols += [
            {"name": "Served", "type": "string", "jsonPath": ".status.servedVersion"},
            {"name": "TP", "type": "string", "jsonPath": ".spec.tensor_parallel", "priority": 1},
            {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
        ]
    cols.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
    return cols


def crd(kind: str) -> dict:
    """The full CustomResourceDefinition object for one of our kinds."""
    info = KINDS[kind]
    spec = spec_schema(info["spec_kind"])
    if kind in JOB_KINDS:
        # A submitted job is a record of what ran: changing it would lie. Create a new one.
        spec["x-kubernetes-validations"] = [{"rule": "self == oldSelf", "message": f"a {kind}'s spec is immutable once created; create a new {kind}"}]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info['plural']}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "llm-platform"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": info["plural"], "singular": info["singular"], "shortNames": info["short"], "categories": ["llmplatform"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _printer_columns(kind),
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": spec.get("description", ""),
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": _status_schema(kind),
                    },
                }},
            }],
        },
    }


def render(kind: str) -> str:
    """The YAML text committed under manifests/crds/ for a kind."""
    header = f"# GENERATED by `python -m llmoperator.crdgen manifests/crds` from llmplatform.specs; do not edit.\n"
    return header + yaml.safe_dump(crd(kind), sort_keys=False, width=120)


def filename(kind: str) -> str:
    return f"{GROUP}_{KINDS[kind]['plural']}.yaml"


def write_all(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in KINDS:
        path = out_dir / filename(kind)
        path.write_text(render(kind), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "manifests/crds")
    for path in write_all(out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
