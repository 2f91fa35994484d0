"""validate_dataset and `platformctl data validate` on the new shapes: shape counts, trained spans, every bad record."""

from __future__ import annotations

import json

from llmplatform.cli.main import main
from llmplatform.data import load_and_tokenize, validate_dataset
from llmplatform.specs import DataSpec

from datatest_helpers import chat, write_jsonl


def weighted(first_weight: int | None) -> dict:
    first = {"role": "assistant", "content": "The first answer is long and wordy"}
    if first_weight is not None:
        first["weight"] = first_weight
    return {"messages": [{"role": "user", "content": "q1"}, first,
                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "short"}]}


def test_shapes_are_counted_and_sharegpt_trains_like_chat(tmp_path, tokenizer):
    share = {"conversations": [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "5"}]}
    rows = [chat("What is 2 + 3?", "5"), share, share, {"prompt": "p", "completion": "c"}]
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 64)
    assert report.shapes == {"chat": 1, "sharegpt": 2, "prompt_completion": 1}
    assert "records         4 (chat 1, prompt_completion 1, sharegpt 2)" in report.render()
    as_chat = validate_dataset(write_jsonl(tmp_path / "c.jsonl", [rows[0]]), tokenizer, 64)
    as_share = validate_dataset(write_jsonl(tmp_path / "s.jsonl", [share]), tokenizer, 64)
    assert (as_share.trained_tokens, as_share.masked_tokens, as_share.preview) == (as_chat.trained_tokens, as_chat.masked_tokens, as_chat.preview)


def test_weight_zero_turn_trains_nothing_of_that_answer(tmp_path, tokenizer):
    plain = validate_dataset(write_jsonl(tmp_path / "a.jsonl", [weighted(None)]), tokenizer, 128)
    masked = validate_dataset(write_jsonl(tmp_path / "b.jsonl", [weighted(0)]), tokenizer, 128)
    explicit = validate_dataset(write_jsonl(tmp_path / "c.jsonl", [weighted(1)]), tokenizer, 128)
    assert explicit.trained_tokens == plain.trained_tokens
    assert 0 < masked.trained_tokens < plain.trained_tokens
    assert masked.trained_tokens + masked.masked_tokens == plain.trained_tokens + plain.masked_tokens
    assert "wordy" in masked.preview and "wordy" not in masked.preview.split("[[", 2)[1]  # first trained span is the short answer


def test_text_records_train_their_tokens_and_split_like_others(tmp_path, tokenizer):
    rows = [{"text": f"Document number {i} talks about llamas."} for i in range(10)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    report = validate_dataset(path, tokenizer, 64)
    assert report.shapes == {"text": 10} and report.examples == 10
    assert report.masked_tokens <= 10  # at most BOS per record
    assert "llamas" in report.preview.split("[[", 1)[1]
    examples = load_and_tokenize(DataSpec(train=str(path), validation_split=0.2, max_seq_length=64), tokenizer)
    assert len(examples) == 8 and all(ex.trained_tokens > 0 for ex in examples)


def test_cli_reports_every_bad_record_of_a_mixed_file(tmp_path, tiny_dir, capsys):
    rows = [
        chat("q", "a"),
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"text": "a stray document"},
        {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    assert main(["data", "validate", str(path), "--tokenizer", str(tiny_dir)]) == 1
    err = capsys.readouterr().err
    assert "5 bad record(s)" in err
    for expected in ["line 2: conversations[1]: unknown 'from' value 'bot'", "line 3: nothing to train",
                     "line 4: a preference record", "line 5: a text record in a file of conversations",
                     "line 6: messages[0]: weight on a user message"]:
        assert expected in err, err
    assert main(["data", "validate", str(path), "--tokenizer", str(tiny_dir), "-o", "json"]) == 1
    body = json.loads(capsys.readouterr().out)
    assert [p["location"].split(":")[0] for p in body["problems"]] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    good = write_jsonl(tmp_path / "good.jsonl", [rows[0], rows[6], weighted(0)])
    assert main(["data", "validate", str(good), "--tokenizer", str(tiny_dir), "--format", "auto", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["shapes"] == {"chat": 2, "sharegpt": 1}
    assert main(["data", "validate", str(good), "--tokenizer", str(tiny_dir), "--format", "sharegpt"]) == 1
    assert "line 1: missing field 'conversations' (format sharegpt)" in capsys.readouterr().err
