"""`platformctl spec resolve`: the resolved plan of a spec, every derived value with its source.

Gathers the target's facts (`backends.facts`), resolves once (`llmplatform.resolve`) and prints
the document as a table, JSON or YAML. A plan with values the target cannot satisfy prints with
every problem listed and exits 1, before anything is created.
"""

from __future__ import annotations

import json
from enum import Enum

import typer
import yaml

from llmplatform.cli.output import emit_json, render_table
from llmplatform.resolve import Resolved


class PlanOutput(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def resolve_file(path: str, target: str = "local", gpu_type: str | None = None) -> Resolved:
    """Load a spec file, gather the target's facts, resolve it (problems listed, not raised)."""
    from llmplatform import specs
    from llmplatform.backends import facts
    from llmplatform.resolve import resolve

    spec = specs.load_spec(path)
    if isinstance(spec, specs.FineTuneSpec):
        return resolve(spec, facts.finetune_facts(spec, target, gpu_type))
    from llmplatform.backends.serving import with_tracking_uri
    from llmplatform.errors import StackError

    try:
        spec = with_tracking_uri(spec)
    except StackError:
        pass  # no registry to ask: the resolve step names the references it could not look up
    vllm = False if target == "k8s" else None  # k8s: the platform image (no vLLM yet); else this environment
    return resolve(spec, facts.serve_facts(spec, target, gpu_type=gpu_type, vllm_available=vllm))


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def render(plan: Resolved) -> str:
    """The plan as text: one row per value (value, source, why), then the problems."""
    rows = [{"value": name, "resolved": _cell(d.value), "source": d.source, "why": d.reason} for name, d in plan.values.items()]
    lines = [f"{plan.kind} spec '{plan.spec.name}' on target {plan.facts.target}", "", render_table(rows, ["value", "resolved", "source", "why"])]
    if plan.problems:
        lines += ["", f"{len(plan.problems)} value(s) cannot be satisfied:", *[f"  - {p.render()}" for p in plan.problems]]
    return "\n".join(lines)


def resolve_command(
    spec_file: str = typer.Argument(..., metavar="SPEC.yaml", help="Fine-tune or serve spec (YAML/JSON; a FineTuneJob/ModelDeployment CR works too)."),
    gpu_type: str = typer.Option(None, "--gpu-type", help="Plan for this GPU type instead of the spec's resources.gpu_type (a100-80gb, h100-80gb, l4-24gb, ...)."),
    target: str = typer.Option("local", "--target", "-t", help="local, ray or k8s: whose facts to resolve against."),
    output: PlanOutput = typer.Option(PlanOutput.table, "--output", "-o", help="table for people; json or yaml for scripts (the document the job or the Serve app receives)."),
) -> None:
    """Print the resolved plan of SPEC: every derived value and where it came from (spec, planner,
    registry, target, default). Exits 1, listing every problem, when the target cannot satisfy it."""
    from llmplatform.errors import JobError

    if target not in ("local", "ray", "k8s"):
        raise JobError(f"--target {target!r} is unknown; use local, ray or k8s")
    plan = resolve_file(spec_file, target, gpu_type)
    if output == PlanOutput.json:
        emit_json(plan.to_dict())
    elif output == PlanOutput.yaml:
        typer.echo(yaml.safe_dump(plan.to_dict(), sort_keys=False).rstrip())
    else:
        typer.echo(render(plan))
    if plan.problems:
        raise typer.Exit(1)
