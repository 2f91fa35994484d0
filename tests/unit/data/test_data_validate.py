"""validate_dataset reports and load_and_tokenize for a spec's data section."""

from __future__ import annotations

import hashlib

import pytest

from llmplatform.data import (
    DataReport,
    dataset_sha256,
    load_and_tokenize,
    load_records,
    pack_examples,
    tokenize_messages,
    validate_dataset,
)
from llmplatform.errors import DataError
from llmplatform.specs import DataSpec, FineTuneSpec

from datatest_helpers import chat, write_jsonl


def _rows(n: int) -> list[dict]:
    """Length-skewed chat and prompt/completion records."""
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)})
        else:
            rows.append(chat(f"Repeat the word {i} times: echo", " ".join(["echo"] * (i % 17 + 1))))
    return rows


def test_report_stats_match_the_tokens(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", _rows(30))
    max_len = 40
    report = validate_dataset(path, tokenizer, max_len)
    assert isinstance(report, DataReport)
    full = [tokenize_messages(r.messages, tokenizer) for r in load_records(path)]
    lengths = sorted(len(e) for e in full)
    assert report.records == 30 and report.shapes == {"prompt_completion": 10, "chat": 20}
    assert report.tokens_max == lengths[-1]
    assert report.tokens_p50 == lengths[14] and report.tokens_p95 == lengths[28]  # nearest rank
    over = sum(1 for n in lengths if n > max_len)
    assert 0 < over < 30 and report.over_max_len == over and report.over_max_len_share == pytest.approx(over / 30)
    assert report.truncated + report.dropped == over and report.examples == 30 - report.dropped
    kept_tokens = sum(min(n, max_len) for n in lengths)
    assert report.trained_tokens + report.masked_tokens <= kept_tokens
    assert report.trained_tokens > 0 and report.masked_tokens > report.trained_tokens
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == dataset_sha256(path)
    assert report.preview.startswith("<s>[INST] ") and report.preview.endswith("</s>]]")
    assert "[/INST][[ " in report.preview
    assert report.to_dict()["tokens_p95"] == report.tokens_p95 and "p95" in report.render()


def test_drop_policy_counts_dropped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", _rows(30))
    right = validate_dataset(path, tokenizer, 40, truncation="right")
    drop = validate_dataset(path, tokenizer, 40, truncation="drop")
    assert drop.dropped == right.over_max_len and drop.truncated == 0 and drop.examples == 30 - drop.dropped
    with pytest.raises(DataError, match="every example was dropped"):
        validate_dataset(path, tokenizer, 16, truncation="drop")


def test_bad_records_raise_with_all_locations(tmp_path, tokenizer):
    rows = _rows(5) + ["{nope", {"prompt": "p", "completion": ""}]
    with pytest.raises(DataError) as err:
        validate_dataset(write_jsonl(tmp_path / "t.jsonl", rows), tokenizer, 64)
    assert [p.location for p in err.value.problems] == ["line 6", "line 7"]


def _spec(train, validation=None, **data) -> FineTuneSpec:
    return FineTuneSpec(name="job", base_model="llama2-tiny", data=DataSpec(train=str(train), validation=str(validation) if validation else None, **data))


def test_spec_validates_both_files_and_names_the_file_of_each_problem(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", _rows(8))
    val = write_jsonl(tmp_path / "val.jsonl", _rows(3) + [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError) as err:
        validate_dataset(_spec(train, val), tokenizer)
    assert [p.location for p in err.value.problems] == [f"{val}: line 4: messages[0]"]
    val = write_jsonl(tmp_path / "val.jsonl", _rows(3))
    report = validate_dataset(_spec(train, val, max_seq_length=32), tokenizer)
    assert report.max_len == 32 and report.records == 8 and report.validation.records == 3
    assert report.validation.split == "validation"
    assert report.packed_sequences is None
    packed = validate_dataset(_spec(train, val, max_seq_length=96, packing=True), tokenizer)
    kept = load_and_tokenize(_spec(train, val, max_seq_length=96).data, tokenizer, "train")
    assert packed.packed_sequences == len(pack_examples(kept, 96)) < len(kept)
    assert packed.packing_fill == pytest.approx(sum(len(e) for e in kept) / (96 * packed.packed_sequences))


def test_spec_system_prompt_applies_to_records_without_one(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("hi", "hello")])
    report = validate_dataset(_spec(train, system_prompt="Be kind."), tokenizer)
    assert report.preview.startswith("<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nhi [/INST][[ hello </s>]]")


def test_load_and_tokenize_holds_out_deterministically(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", _rows(40))
    spec = _spec(train, validation_split=0.1, max_seq_length=64)
    tr = load_and_tokenize(spec.data, tokenizer, "train", seed=1)
    va = load_and_tokenize(spec.data, tokenizer, "validation", seed=1)
    assert len(tr) == 36 and len(va) == 4
    assert {e.location for e in tr}.isdisjoint({e.location for e in va})
    assert [e.location for e in load_and_tokenize(spec.data, tokenizer, "validation", seed=1)] == [e.location for e in va]
    assert [e.location for e in load_and_tokenize(spec.data, tokenizer, "validation", seed=2)] != [e.location for e in va]
    assert all(len(e) <= 64 for e in tr)
    no_eval = _spec(train, validation_split=0.0)
    assert len(load_and_tokenize(no_eval.data, tokenizer, "train")) == 40
    assert load_and_tokenize(no_eval.data, tokenizer, "validation") == []


def test_missing_validation_file_is_reported_with_the_train_problems(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", _rows(3) + ["{bad"])
    with pytest.raises(DataError) as err:
        validate_dataset(_spec(train, tmp_path / "nope.jsonl"), tokenizer)
    assert [p.location for p in err.value.problems] == [f"{train}: line 4", f"{tmp_path / 'nope.jsonl'}: (file)"]
    assert "file not found" in str(err.value)
