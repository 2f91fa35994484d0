"""Generated references must match the code: regenerate and compare with what is committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmplatform import docgen

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", sorted(docgen.GENERATED))
def test_generated_reference_is_current(rel):
    committed = (REPO / rel).read_text(encoding="utf-8")
    fresh = docgen.GENERATED[rel]()
    assert committed == fresh, f"{rel} is stale: run `.venv/bin/python -m llmplatform.docgen .` and commit it"


def test_spec_reference_names_every_field():
    from llmplatform.specs import FineTuneSpec, ServeSpec

    text = docgen.spec_reference()
    for model in (FineTuneSpec, ServeSpec):
        for name in model.model_fields:
            assert f"| `{name}` |" in text


def test_cli_reference_lists_every_noun():
    text = docgen.cli_reference()
    for noun in ("up", "down", "status", "plan", "spec", "data", "finetune", "models", "serve"):
        assert f"`platformctl {noun}`" in text


def test_readme_sizing_table_is_the_planners():
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- sizing:start -->\n", 1)[1].split("\n<!-- sizing:end -->", 1)[0]
    assert block.splitlines() == docgen.sizing_rows("a100-80gb")
