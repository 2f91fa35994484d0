"""The operator's Role grants exactly the (resource, verb) pairs its code uses, no more, no less.

The pairs are derived from the operator's source: every `deps.api.<method>("<Kind>", ...)` call
(and the `create(obj)` calls, whose kind is that of the builder that made `obj`), every status
write through `_set_status`, and what kopf itself needs for each resource a handler is registered
on (list + watch; patch for the annotations and finalizer it keeps on resources with
create/update/resume/timer handlers; create on events for what it posts).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import yaml

from llmplatform.kube import KINDS

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operators" / "llmoperator"
RBAC = REPO / "manifests" / "base" / "operator" / "rbac.yaml"

API_VERBS = {"get": ("", "get"), "list": ("", "list"), "create": ("", "create"), "patch": ("", "patch"),
             "patch_status": ("/status", "patch"), "delete": ("", "delete")}
WRAPPERS = {"_set_status": "patch_status", "_permanent": "patch_status"}  # operator functions (deps, kind, ...) that call deps.api
BUILDERS = {"rayjob_for": "RayJob", "rayservice_for": "RayService", "rayservice_of": "RayService"}  # what `create(obj)` creates
KOPF_STATEFUL = {"create", "update", "resume", "delete", "timer", "daemon"}  # kopf patches progress annotations


def _resource(kind: str, sub: str = "") -> tuple[str, str]:
    group, _, plural = KINDS[kind]
    return group, plural + sub


def _builder_kinds(func: ast.AST) -> dict[str, str]:
    """Variables in `func` assigned from a known builder call -> the kind they hold."""
    found = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            callee = node.value.func
            name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", "")
            if name in BUILDERS:
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found[target.id] = BUILDERS[name]
    return found


def _api_calls(tree: ast.AST) -> set[tuple[str, str, str]]:
    used = set()
    for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        built = _builder_kinds(func)
        for call in [n for n in ast.walk(func) if isinstance(n, ast.Call)]:
            f = call.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute) and f.value.attr == "api":
                method, args = f.attr, call.args
            elif isinstance(f, ast.Name) and f.id in WRAPPERS:
                method, args = WRAPPERS[f.id], call.args[1:]
            else:
                continue
            assert method in API_VERBS, f"{func.name}: unknown KubeApi method {method}"
            if method == "create":
                assert isinstance(args[0], ast.Name) and args[0].id in built, f"{func.name}: create() of an object of unknown kind"
                kind = built[args[0].id]
            elif isinstance(args[0], ast.Constant):
                kind = args[0].value
            else:
                assert func.name in WRAPPERS, f"{func.name}: api.{method} with a kind the test cannot read"
                continue
            sub, verb = API_VERBS[method]
            used.add((*_resource(kind, sub), verb))
    return used


def _resource_args(decorator: ast.Call, constants: dict[str, tuple]) -> tuple[str, str] | None:
    args = decorator.args
    if args and isinstance(args[0], ast.Starred):
        group, _, plural = constants[args[0].value.id]
        return group, plural
    if len(args) >= 3 and all(isinstance(a, ast.Constant) for a in args[:3]):
        return args[0].value, args[2].value
    return None


def _kopf_needs(tree: ast.AST, module: str) -> set[tuple[str, str, str]]:
    constants = vars(importlib.import_module(module))  # e.g. FTJ = (GROUP, "v1alpha1", "finetunejobs")
    needs = {("", "events", "create")}
    for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for dec in func.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
                continue
            text = ast.unparse(dec.func)
            if not text.startswith("kopf."):
                continue
            resource = _resource_args(dec, constants)
            assert resource, f"{func.name}: kopf handler on a resource the test cannot read ({text})"
            needs |= {(*resource, "list"), (*resource, "watch")}
            if dec.func.attr in KOPF_STATEFUL:
                needs.add((*resource, "patch"))
    return needs


def used_by_operator() -> set[tuple[str, str, str]]:
    used = set()
    for path in OPERATOR.rglob("*.py"):
        tree = ast.parse(path.read_text())
        module = ".".join(path.relative_to(OPERATOR.parent).with_suffix("").parts)
        used |= _api_calls(tree) | _kopf_needs(tree, module)
    return used


def granted_by_role() -> set[tuple[str, str, str]]:
    [role] = [d for d in yaml.safe_load_all(RBAC.read_text()) if d and d["kind"] == "Role"]
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_role_grants_exactly_what_the_operator_uses():
    used, granted = used_by_operator(), granted_by_role()
    assert ("ray.io", "rayjobs", "create") in used and ("llmplatform.io", "finetunejobs/status", "patch") in used  # the scan sees calls
    assert granted - used == set(), f"granted but never used: {sorted(granted - used)}"
    assert used - granted == set(), f"used but not granted: {sorted(used - granted)}"


def test_the_role_comment_names_no_unused_verb():
    header = RBAC.read_text().split("apiVersion", 1)[0]
    assert "exactly the verbs" in header and "test_operator_rbac" in header
    assert "RayJobs/RayServices it creates, patches\n# and deletes" not in header
