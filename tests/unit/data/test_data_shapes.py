"""ShareGPT, per-message weight, text and preference records: valid and invalid, each bad record located."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmplatform.data import load_records
from llmplatform.data.records import detect_shape
from llmplatform.errors import DataError

from datatest_helpers import chat, write_jsonl

PC = {"prompt": "Spell cat", "completion": "c a t"}


def sharegpt(*turns: tuple[str, str], **extra) -> dict:
    return {"conversations": [{"from": who, "value": text} for who, text in turns], **extra}


def problems_of(tmp_path, rows, **kwargs) -> dict[str, list[str]]:
    """{location: [messages]} of the DataError that loading `rows` raises."""
    with pytest.raises(DataError) as err:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows), **kwargs)
    found: dict[str, list[str]] = {}
    for p in err.value.problems:
        found.setdefault(p.location, []).append(p.render())
    return found


def test_sharegpt_maps_speakers_to_roles_with_optional_system(tmp_path):
    rows = [
        sharegpt(("human", "Hi"), ("gpt", "Hello"), ("user", "And?"), ("assistant", "Bye")),
        sharegpt(("system", "Be terse."), ("human", "2+2?"), ("gpt", "4")),
        sharegpt(("human", "q"), ("gpt", "a"), system="Top-level system."),
    ]
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [r.shape for r in records] == ["sharegpt"] * 3
    assert records[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                   {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye"}]
    assert records[1].messages[0] == {"role": "system", "content": "Be terse."}
    assert records[2].messages[0] == {"role": "system", "content": "Top-level system."}
    assert load_records(write_jsonl(tmp_path / "e.jsonl", rows), fmt="sharegpt")[2].messages == records[2].messages


SHAREGPT_BAD = [
    (sharegpt(("human", "q"), ("bot", "a")), "conversations[1]", "unknown 'from' value 'bot'"),
    (sharegpt(("human", "q"), ("function_call", "a")), "conversations[1]", "human, user, gpt, assistant, system"),
    ({"conversations": [{"value": "q"}, {"from": "gpt", "value": "a"}]}, "conversations[0]", "missing field 'from'"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "conversations[0]", "missing field 'value'"),
    (sharegpt(("gpt", "a"), ("human", "q")), "conversations[0]", "misordered roles"),
    (sharegpt(("human", "q"), ("gpt", " ")), "conversations[1]", "empty assistant turn"),
    ({"conversations": "hi"}, "", "'conversations' must be a list"),
    ({"conversations": []}, "", "'conversations' is empty"),
    (sharegpt(("system", "s"), ("human", "q"), ("gpt", "a"), system="t"), "", "two system prompts"),
]


@pytest.mark.parametrize("row,where,reason", SHAREGPT_BAD, ids=[r for *_, r in SHAREGPT_BAD])
def test_bad_sharegpt_records_name_line_turn_and_fix(tmp_path, row, where, reason):
    found = problems_of(tmp_path, [PC, row, PC])
    location = "line 2" + (f": {where}" if where else "")
    assert list(found) == [location], found
    assert any(reason in text for text in found[location]), found


def test_weight_is_kept_on_assistant_turns_as_an_int(tmp_path):
    row = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "old", "weight": 0},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "new", "weight": 1.0},
                        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "plain"}]}
    turns = sharegpt(("human", "q"), ("gpt", "skip")) | {}
    turns["conversations"][1]["weight"] = 0
    turns["conversations"].extend([{"from": "human", "value": "q2"}, {"from": "gpt", "value": "keep", "weight": 1}])
    chat_record, share_record = load_records(write_jsonl(tmp_path / "d.jsonl", [row, turns]))
    assert [m.get("weight") for m in chat_record.messages] == [None, 0, None, 1, None, None]
    assert isinstance(chat_record.messages[3]["weight"], int)
    assert chat_record.messages[5] == {"role": "assistant", "content": "plain"}  # absent weight stays absent
    assert [m.get("weight") for m in share_record.messages] == [None, 0, None, 1]


WEIGHT_BAD = [
    ({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}, "messages[0]", "weight on a user message"),
    ({"messages": [{"role": "system", "content": "s", "weight": 0}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "messages[0]", "weight on a system message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}, "messages[1]", "weight must be 0"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}, "messages[1]", "accepted: 0 or 1"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "1"}]}, "messages[1]", "weight must be 0"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": True}]}, "messages[1]", "weight must be 0"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                   {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "weight": 0}]}, "", "nothing to train"),
    (sharegpt(("human", "q"), ("gpt", "a")) | {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 0}]},
     "", "every assistant turn has weight 0"),
]


@pytest.mark.parametrize("row,where,reason", WEIGHT_BAD, ids=[r for *_, r in WEIGHT_BAD])
def test_bad_weights_name_line_message_and_fix(tmp_path, row, where, reason):
    found = problems_of(tmp_path, [PC, PC, row])
    location = "line 3" + (f": {where}" if where else "")
    assert list(found) == [location], found
    assert any(reason in text for text in found[location]), found


def test_text_records_for_continued_pretraining(tmp_path):
    rows = [{"text": "The cat sat on the mat."}, {"text": "Second document.\nWith two lines.", "source": "wiki"}]
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(r.shape, r.messages, r.text) for r in records] == [("text", [], rows[0]["text"]), ("text", [], rows[1]["text"])]
    found = problems_of(tmp_path, [rows[0], {"text": "  \n"}, {"text": 3}, {"text": None}])
    assert sorted(found) == ["line 2", "line 3", "line 4"]
    assert "empty text" in found["line 2"][0] and "non-text content in 'text'" in found["line 3"][0]


def test_an_alpaca_row_with_a_rendered_text_column_stays_alpaca():
    assert detect_shape({"instruction": "i", "input": "", "output": "o", "text": "### Instruction: i ..."}) == "alpaca"


def test_preference_records_are_detected_and_refused_for_sft(tmp_path):
    pref = {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."}
    assert detect_shape(pref) == "preference"
    assert detect_shape({"chosen": [{"role": "user", "content": "q"}], "rejected": []}) == "preference"
    found = problems_of(tmp_path, [PC, pref])
    assert list(found) == ["line 2"]
    assert "preference record" in found["line 2"][0] and "objective: dpo" in found["line 2"][0]


def test_text_and_conversations_in_one_file_report_each_minority_record(tmp_path):
    text = {"text": "a document"}
    rows = [chat("q", "a"), text, sharegpt(("human", "q"), ("gpt", "a")), PC, text]
    found = problems_of(tmp_path, rows)
    assert list(found) == ["line 2", "line 5"]
    assert all("text record in a file of conversations" in t[0] and "one kind per file" in t[0] for t in found.values())
    found = problems_of(tmp_path, [text, text, PC, text])
    assert list(found) == ["line 3"] and "prompt_completion record in a file of text records" in found["line 3"][0]


def test_a_mixed_file_reports_every_bad_record_of_every_new_shape_in_order(tmp_path):
    rows = [
        chat("q", "a"),                                                   # 1 good
        sharegpt(("human", "q"), ("robot", "a")),                         # 2 unknown from
        {"messages": [{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}]},  # 3 weight on user
        sharegpt(("human", "q"), ("gpt", "a")),                           # 4 good
        {"prompt": "p", "chosen": "c", "rejected": "r"},                  # 5 preference
        {"text": "a document"},                                           # 6 text among conversations
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},  # 7 nothing to train
        "{broken",                                                        # 8 invalid JSON
        PC,                                                               # 9 good
    ]
    found = problems_of(tmp_path, rows)
    assert [loc.split(":")[0] for loc in found] == ["line 2", "line 3", "line 5", "line 6", "line 7", "line 8"]


def test_parquet_nulls_are_absent_fields_so_weights_and_mixed_shapes_read_right(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "b"}]},
        PC,
    ]
    columns = {key: [row.get(key) for row in rows] for row in rows for key in row}
    pq.write_table(pa.table(columns), tmp_path / "d.parquet")  # every row gets every column, nulls where absent
    records = load_records(tmp_path / "d.parquet")
    assert [r.shape for r in records] == ["chat", "sharegpt", "prompt_completion"]
    assert records[0].messages[0] == {"role": "user", "content": "q"}  # user's null weight is no weight
    assert [m.get("weight") for m in records[0].messages] == [None, 0, None, None]


def test_every_record_example_in_the_data_docs_is_valid(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "data.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```jsonl\n")[1:]]
    shapes = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.jsonl"
        path.write_text(block, encoding="utf-8")
        shapes += [r.shape for r in load_records(path)]
    assert shapes == ["chat", "chat", "sharegpt", "prompt_completion", "alpaca", "text"]
