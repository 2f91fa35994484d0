"""Preference records: every accepted shape parses; every bad record of a mixed file is reported
with its line, field and fix; pairs tokenize with labels on the final answer only and follow
SFT's truncation policy; DPO spec mistakes name their field."""

from __future__ import annotations

import json

import pytest

from llmplatform.data.preference import load_preference_records, tokenize_pair, validate_preference_dataset
from llmplatform.errors import DataError, SpecError

GOOD = [
    {"prompt": "What is 2 + 2?", "chosen": "4. Glad to help!", "rejected": "4.", "system": "Be kind."},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": {"role": "assistant", "content": "What."}},
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],  # TRL's implicit prompt
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
]
BAD = {
    4: ({"prompt": "q", "chosen": "a"}, "line 4", "missing field 'rejected'"),
    5: ({"prompt": "q", "chosen": "", "rejected": "b"}, "line 5: chosen", "empty answer"),
    6: ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "line 6: prompt[0]", "misordered roles"),
    7: ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "line 7: chosen", "assistant message"),
    8: ({"prompt": "q", "chosen": "a", "rejected": 3}, "line 8: rejected", "not an answer"),
    9: ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}, "line 9: chosen", "share every message"),
    10: ({"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"}, "line 10: prompt[0]", "non-text content"),
}


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_every_accepted_shape_becomes_prompt_messages_and_two_answers(tmp_path):
    records = load_preference_records(_write(tmp_path / "p.jsonl", GOOD))
    assert [r.location for r in records] == ["line 1", "line 2", "line 3"]
    assert records[0].prompt == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert (records[1].chosen, records[1].rejected) == ("Hello!", "What.")
    assert records[2].prompt == [{"role": "user", "content": "Hi"}] and records[2].rejected == "Go away."


def test_a_mixed_file_reports_each_bad_record_with_its_line_field_and_fix(tmp_path):
    rows = GOOD + [v[0] for v in BAD.values()] + ["{not json"]
    with pytest.raises(DataError) as err:
        load_preference_records(_write(tmp_path / "mixed.jsonl", rows))
    problems = err.value.problems
    for line, (_, location, message) in BAD.items():
        found = [p for p in problems if p.location == location and message in p.message]
        assert found, f"line {line}: no problem at {location!r} saying {message!r} in {[p.render() for p in problems]}"
    assert any(p.location == "line 11" for p in problems)  # the invalid JSON line
    assert not any(p.location.startswith(("line 1", "line 2", "line 3")) and p.location[5:6] in ("", ":") for p in problems)
    assert all(p.accepted or "JSON" in p.message or "Expecting" in p.message for p in problems)  # each says what would do


def test_only_the_final_answer_is_trained_and_both_sides_share_the_prompt(tiny_random_dir, tmp_path):
    from llmplatform.training.model_setup import load_tokenizer

    tok = load_tokenizer(tiny_random_dir)
    multi = {"prompt": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
                        {"role": "user", "content": "two"}], "chosen": "yes please", "rejected": "no"}
    record = load_preference_records(_write(tmp_path / "m.jsonl", [multi]))[0]
    assert record.conversation("x")[1]["weight"] == 0  # the earlier assistant turn carries no loss
    pair = tokenize_pair(record, tok, max_len=256)
    for side, answer in ((pair.chosen, "yes please"), (pair.rejected, "no")):
        trained = [t for t in side["labels"] if t != -100]
        assert tok.decode(trained, skip_special_tokens=True).strip() == answer
    first = pair.chosen["labels"].index(next(t for t in pair.chosen["labels"] if t != -100))
    assert pair.chosen["input_ids"][:first] == pair.rejected["input_ids"][:first]


def test_truncation_follows_the_sft_policy(tiny_random_dir, tmp_path):
    from llmplatform.training.model_setup import load_tokenizer

    tok = load_tokenizer(tiny_random_dir)
    record = load_preference_records(_write(tmp_path / "t.jsonl", [{"prompt": "short", "chosen": "word " * 60, "rejected": "no"}]))[0]
    right = tokenize_pair(record, tok, max_len=24, truncation="right")
    assert right.truncated and len(right.chosen["input_ids"]) == 24 and right.rejected["labels"][-1] == tok.eos_token_id
    assert tokenize_pair(record, tok, max_len=24, truncation="drop") is None  # one side too long drops the pair


def test_validation_reports_both_files_and_counts_pairs(spec_for, tmp_path):
    train = _write(tmp_path / "train.jsonl", GOOD)
    bad = _write(tmp_path / "val.jsonl", [GOOD[0], BAD[5][0]])
    spec = spec_for(objective="dpo", data={"train": str(train), "validation": str(bad)})
    from llmplatform.training.model_setup import load_tokenizer

    tok = load_tokenizer(spec.base_model)
    with pytest.raises(DataError) as err:
        validate_preference_dataset(spec, tok)
    assert [p.location for p in err.value.problems] == [f"{bad}: line 2: chosen"]
    good = spec_for(objective="dpo", data={"train": str(train), "validation": str(train)})
    report = validate_preference_dataset(good, tok)
    assert report.records == report.pairs == 3 and report.validation.pairs == 3 and report.tokens_max > 0


def test_dpo_spec_mistakes_name_their_field(spec_for):
    from llmplatform.resolve import resolve_finetune

    with pytest.raises(SpecError) as err:
        spec_for(objective="dpo", dpo={"loss_type": "sigmod", "beta": 0})
    assert {p.location for p in err.value.problems} == {"dpo.loss_type", "dpo.beta"}
    assert "did you mean 'sigmoid'" in str(err.value) and "ipo" in str(err.value)
    with pytest.raises(SpecError) as err:
        spec_for(objective="ppo")
    assert [p.location for p in err.value.problems] == ["objective"]
    plan = resolve_finetune(spec_for(objective="dpo", data={"packing": True, "format": "chat"}))
    assert {p.location for p in plan.problems} == {"data.packing", "data.format"}
    ok = resolve_finetune(spec_for(objective="dpo", dpo={"beta": 0.2}))
    assert not ok.problems and (ok["objective"], ok["dpo_beta"], ok["dpo_loss_type"]) == ("dpo", 0.2, "sigmoid")
    assert ok.source("dpo_beta") == "spec" and ok.source("dpo_loss_type") == "default"
    assert resolve_finetune(spec_for())["objective"] == "sft"


def test_the_planner_sizes_a_dpo_micro_batch_as_chosen_plus_rejected(spec_for):
    from llmplatform.resolve import resolve_finetune

    sized = {o: resolve_finetune(spec_for(base_model="llama2-7b", objective=o, resources={"gpu_type": "a100-80gb"},
                                          hyperparameters={"micro_batch_size": 4})) for o in ("sft", "dpo")}
    assert sized["dpo"]["sequences_per_micro_batch"] == 8
    assert sized["dpo"]["memory_per_worker_gib"] > sized["sft"]["memory_per_worker_gib"]


def test_every_preference_example_in_the_data_docs_is_valid(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "data.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```json\n")[1:] if "chosen" in b.split("```", 1)[0]]
    assert len(blocks) == 1
    records = load_preference_records(_write(tmp_path / "docs.jsonl", [blocks[0].strip()]))
    assert len(records) == 3 and records[2].prompt == [{"role": "user", "content": "Hi"}]
