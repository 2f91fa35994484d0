"""Spec validation: every field rejects bad input with its path, and all problems come together."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from llmplatform import specs
from llmplatform.cli.main import main
from llmplatform.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {
    "finetune": {"name": "job-a", "base_model": "llama2-tiny", "data": {"train": "train.jsonl"}},
    "serve": {"name": "svc-a", "model": {"base": "llama2-tiny"}},
    "eval": {"name": "eval-a", "models": ["llama2-tiny"], "dataset": {"name": "reverse", "path": "eval.jsonl"}},
}


def _leaf_fields(model: type[BaseModel], prefix: tuple = ()):
    """(path, FieldInfo) for every field of a spec, descending into nested sections."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        nested = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is not None and getattr(ann, "__origin__", None) is not list:
            yield from _leaf_fields(nested, prefix + (name,))
        else:
            yield prefix + (name,), field


def _bad_value(field) -> object:
    """A value the field must refuse, chosen from its type and constraints."""
    schema_hint = repr(field.annotation)
    meta = {type(m).__name__: m for m in field.metadata}
    if "Literal" in schema_hint and "int" not in schema_hint.split("Literal")[0]:
        return "not-a-choice"
    if field.annotation is bool:
        return "sometimes"
    if "Ge" in meta or "Gt" in meta:
        bound = getattr(meta.get("Ge"), "ge", None)
        if bound is None:
            bound = meta["Gt"].gt
        return bound - 1
    if "list" in schema_hint:
        return 42
    if "dict" in schema_hint:
        return "not-a-mapping"
    if any(type(m).__name__ == "_PydanticGeneralMetadata" and getattr(m, "pattern", None) for m in field.metadata):
        return "Not Valid!"
    if field.annotation in (int, float) or "int" in schema_hint or "float" in schema_hint:
        return "not-a-number"
    return {"a": "mapping"}  # str fields refuse mappings


def _set(data: dict, path: tuple, value) -> dict:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return data


FIELD_CASES = [
    (kind, path, field)
    for kind, model in specs.SPEC_KINDS.items()
    for path, field in _leaf_fields(model)
]


@pytest.mark.parametrize("kind,path,field", FIELD_CASES, ids=[f"{k}:{'.'.join(p)}" for k, p, _ in FIELD_CASES])
def test_every_field_refuses_bad_input_with_its_path(kind, path, field):
    import copy

    assert field.description, f"{kind} field {'.'.join(path)} has no description"
    data = _set(copy.deepcopy(MINIMAL[kind]), path, _bad_value(field))
    with pytest.raises(SpecError) as err:
        specs.parse_spec(kind, data, "t.yaml")
    where = [p.location for p in err.value.problems]
    dotted = ".".join(path)
    assert any(loc == dotted or loc.startswith(dotted + ".") for loc in where), (dotted, where)


def test_every_section_refuses_unknown_fields_and_suggests_the_right_one():
    data = {"name": "job-a", "base_model": "llama2-tiny", "data": {"train": "x", "max_seq_lenght": 4}, "lora": {"rnak": 8}}
    with pytest.raises(SpecError) as err:
        specs.parse_spec("finetune", data)
    text = str(err.value)
    assert "data.max_seq_lenght: unknown field; did you mean 'max_seq_length'?" in text
    assert "lora.rnak: unknown field; did you mean 'rank'?" in text


def test_all_problems_are_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        name: Bad_Name
        base_model: llama2-7b
        method: dora
        data:
          train: x.jsonl
          packing: sometimes
        lora:
          rank: 0
          target_modules: [q_proj, foo]
        hyperparameters:
          learning_rate: -1
    """))
    with pytest.raises(SpecError) as err:
        specs.load_spec(bad)
    locations = {p.location for p in err.value.problems}
    assert {"name", "method", "data.packing", "lora.rank", "lora.target_modules", "hyperparameters.learning_rate"} <= locations
    method = next(p for p in err.value.problems if p.location == "method")
    assert method.given == "dora" and "'lora' or 'qlora'" in method.accepted


def test_defaults_follow_the_llama2_recipe():
    spec = specs.parse_spec("finetune", MINIMAL["finetune"])
    hp = spec.hyperparameters
    assert (hp.adam_beta1, hp.adam_beta2, hp.weight_decay, hp.lr_scheduler) == (0.9, 0.95, 0.1, "cosine")
    assert hp.warmup_ratio > 0 and hp.max_grad_norm == 1.0
    assert spec.lora.target_modules == specs.LLAMA_LINEAR_MODULES


@pytest.mark.parametrize("ref,ok", [("models:/support-bot@production", True), ("models:/bot/3", True), ("models:/bot", False), ("runs:/abc/adapter", False)])
def test_serve_registry_reference_format(ref, ok):
    data = {"name": "svc", "model": {"registry": ref}}
    if ok:
        assert specs.parse_spec("serve", data).model.registry == ref
    else:
        with pytest.raises(SpecError, match="model.registry"):
            specs.parse_spec("serve", data)


def test_serve_cross_field_rules():
    with pytest.raises(SpecError) as err:
        specs.parse_spec("serve", {"name": "svc", "model": {}, "tensor_parallel": 3, "autoscaling": {"min_replicas": 4, "max_replicas": 2}})
    text = str(err.value)
    assert "model: set `base`" in text
    assert "tensor_parallel" in text and "power of two" in text
    assert "min_replicas (4) must be <= max_replicas (2)" in text


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: a\ndata:\n  train: [unclosed\n")
    with pytest.raises(SpecError, match=r"line \d+, column \d+"):
        specs.load_spec(bad)


def test_kubernetes_cr_shape_loads_with_metadata_name(tmp_path):
    cr = tmp_path / "cr.yaml"
    cr.write_text(yaml.safe_dump({"apiVersion": "x/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "from-meta"}, "spec": {"base_model": "llama2-tiny", "data": {"train": "t.jsonl"}}}))
    assert specs.load_spec(cr).name == "from-meta"


SHIPPED = sorted((REPO / "jobs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_job_yaml_loads(path):
    doc_kind, body = specs.read_document(path)
    if doc_kind is None and body.get("kind") and body.get("apiVersion"):
        pytest.skip("Kubernetes manifest, validated by tests/k8s")
    spec = specs.load_spec(path)
    assert spec.name


def test_shipped_jobs_exist():
    assert any("finetune" in str(p) for p in SHIPPED) and any("serve" in str(p) for p in SHIPPED)


def test_cli_validate_exit_codes_and_json(tmp_path, capsys):
    good = REPO / "jobs/finetune/llama2-7b-qlora.yaml"
    assert main(["spec", "validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: job\nbase_model: x\ndata: {train: t}\nmethod: full\nlora: {alpha: 0}\n")
    capsys.readouterr()
    assert main(["spec", "validate", str(bad), "--output", "json"]) == 1
    import json

    out = json.loads(capsys.readouterr().out)
    assert out[0]["valid"] is False
    assert {p["location"] for p in out[0]["problems"]} == {"method", "lora.alpha"}


def test_cli_schema_prints_json_schema(capsys):
    import json

    assert main(["spec", "schema", "serve"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "ServeSpec" and schema["additionalProperties"] is False
    assert main(["spec", "schema", "bogus"]) == 1


def test_relative_local_paths_become_absolute_for_workers(tmp_path):
    spec = specs.parse_spec("finetune", {"name": "j", "base_model": "llama2-tiny",
                                         "data": {"train": "data/t.jsonl", "validation": "s3://b/v.jsonl"},
                                         "checkpoint": {"storage_uri": "ckpt"}})
    fixed = specs.resolve_local_paths(spec, tmp_path)
    assert fixed.data.train == str(tmp_path / "data/t.jsonl")
    assert fixed.data.validation == "s3://b/v.jsonl"
    assert fixed.checkpoint.storage_uri == str(tmp_path / "ckpt")
    assert spec.data.train == "data/t.jsonl"  # the original is unchanged


def test_problem_errors_survive_pickling_between_processes():
    import pickle

    from llmplatform.errors import DataError, Problem

    err = pickle.loads(pickle.dumps(DataError("x.jsonl", [Problem("line 3", "empty assistant turn")])))
    assert err.problems[0].location == "line 3" and "line 3: empty assistant turn" in str(err)
