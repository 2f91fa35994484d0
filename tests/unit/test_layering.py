"""The layering contracts of docs/architecture.md ("Layers"), checked on every module's imports.

Each module under platform/ and operators/ is parsed with `ast`, so an import inside a function
(the lazy imports this codebase uses everywhere) counts as much as one at the top. A rule is one
row of RULES: which files it covers, the module prefix they must not import, and the files
exempt from it. A violation names the file, the line, the import and the rule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("platform", "operators")
CLUSTER_CODE = ("platform/llmplatform/training/*", "platform/llmplatform/serving/*")
EVERYTHING = ("platform/*", "operators/*")


@dataclass(frozen=True)
class Rule:
    importers: tuple[str, ...]  # globs of repo-relative paths (`*` crosses folders)
    forbidden: str              # a module and everything below it
    why: str
    allowed: tuple[str, ...] = ()  # globs exempt from the rule


RULES = (
    Rule(CLUSTER_CODE, "llmplatform.stack", "training/ and serving/ run on cluster pods and never import the laptop stack"),
    Rule(("operators/*",), "llmplatform.cli", "the operator does not import the CLI"),
    Rule(("operators/*",), "llmplatform.backends", "the operator does not import the CLI's backends (shared client: llmplatform.kube)"),
    Rule(EVERYTHING, "llmplatform.tiny", "non-laptop code reaches llama2-tiny only through llmplatform.basemodels",
         allowed=("platform/llmplatform/tiny/*", "platform/llmplatform/cli/*", "platform/llmplatform/stack/*",
                  "platform/llmplatform/demo.py", "platform/llmplatform/docgen.py", "platform/llmplatform/basemodels.py")),
    Rule(EVERYTHING, "llmplatform.planner", "the resolve step is the planner's only caller; everything else reads the resolved plan",
         allowed=("platform/llmplatform/resolve/*", "platform/llmplatform/planner.py")),
)


def modules(repo: Path = REPO) -> list[str]:
    """Repo-relative paths of every module under the source roots."""
    return sorted(p.relative_to(repo).as_posix() for root in SOURCE_ROOTS for p in (repo / root).rglob("*.py")
                  if "__pycache__" not in p.parts)


def imports(rel: str, repo: Path = REPO) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file, lazy ones included. `from a import b`
    yields both `a` and `a.b` (b may be a submodule); relative imports are made absolute."""
    tree = ast.parse((repo / rel).read_text(encoding="utf-8"), filename=rel)
    package = rel.split("/")[1:-1]  # platform/llmplatform/serving/app.py -> [llmplatform, serving]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _matches(rel: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch(rel, g) for g in globs)


def violations(rule: Rule, files: list[str], repo: Path = REPO) -> list[str]:
    out = []
    for rel in files:
        if not _matches(rel, rule.importers) or _matches(rel, rule.allowed):
            continue
        hits: dict[int, str] = {}  # line -> the most specific forbidden module imported there
        for line, module in imports(rel, repo):
            if (module == rule.forbidden or module.startswith(rule.forbidden + ".")) and len(module) > len(hits.get(line, "")):
                hits[line] = module
        out += [f"{rel}:{line} imports {module}: {rule.why}" for line, module in sorted(hits.items())]
    return out


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{'+'.join(r.importers)}-not-{r.forbidden}")
def test_layering_rule_holds(rule: Rule):
    files = modules()
    assert any(_matches(rel, rule.importers) for rel in files), f"rule covers no file: {rule}"
    found = violations(rule, files)
    assert not found, "layering contract broken (tests/unit/test_layering.py):\n  " + "\n  ".join(found)


def test_lazy_relative_and_from_imports_are_seen(tmp_path):
    rel = "platform/llmplatform/serving/probe.py"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text("import os\n\ndef f():\n    from llmplatform import stack\n    from ..stack import ports\n"
                   "    import importlib; importlib.import_module('llmplatform.stack.lifecycle')\n")
    assert violations(RULES[0], [rel], tmp_path) == [
        "platform/llmplatform/serving/probe.py:4 imports llmplatform.stack: " + RULES[0].why,
        "platform/llmplatform/serving/probe.py:5 imports llmplatform.stack.ports: " + RULES[0].why,
        "platform/llmplatform/serving/probe.py:6 imports llmplatform.stack.lifecycle: " + RULES[0].why,
    ]
