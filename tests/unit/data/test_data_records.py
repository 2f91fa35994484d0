"""Reading files in every shape and reporting every bad record with its line and reason."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmplatform.data import load_records
from llmplatform.errors import DataError

from datatest_helpers import chat, write_jsonl

GOOD = [
    chat("What is 2 + 3?", "5", "And 4 + 4?", "8", system="Be brief."),
    {"prompt": "Spell cat", "completion": "c a t"},
    {"instruction": "Add the numbers", "input": "1 and 2", "output": "3"},
    {"instruction": "Say hi", "output": "hi", "input": ""},
]


def test_three_shapes_normalise_to_messages(tmp_path):
    records = load_records(write_jsonl(tmp_path / "d.jsonl", GOOD))
    assert [r.shape for r in records] == ["chat", "prompt_completion", "alpaca", "alpaca"]
    assert [r.location for r in records] == ["line 1", "line 2", "line 3", "line 4"]
    assert [m["role"] for m in records[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert records[1].messages == [{"role": "user", "content": "Spell cat"}, {"role": "assistant", "content": "c a t"}]
    assert records[2].messages[0] == {"role": "user", "content": "Add the numbers\n\n1 and 2"}
    assert records[3].messages[0] == {"role": "user", "content": "Say hi"}  # empty input adds nothing


def test_explicit_format_refuses_other_shapes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(DataError) as err:
        load_records(path, fmt="chat")
    assert [p.location for p in err.value.problems] == ["line 2", "line 3", "line 4"]
    assert all("missing field 'messages'" in p.message for p in err.value.problems)


BAD = [
    ("not json {", "invalid JSON"),
    ("[1, 2]", "not an object"),
    ('"just text"', "not an object"),
    ({"prompt": "p"}, "missing field 'completion'"),
    ({"instruction": "do"}, "missing field 'output'"),
    ({"body": "raw"}, "missing fields: no known record shape"),
    ({"messages": []}, "missing fields"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing field 'content'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "misordered roles"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}]}, "misordered roles: 'system'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]}, "misordered roles"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]}, "ends with a user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]}, "empty assistant turn"),
    ({"prompt": "p", "completion": ""}, "empty assistant turn"),
    ({"instruction": "i", "output": ""}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]}, "non-text content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"text": "a"}}]}, "non-text content"),
    ({"prompt": 12, "completion": "a"}, "non-text content"),
    ({"instruction": "i", "output": None}, "non-text content"),
]


@pytest.mark.parametrize("row,reason", BAD, ids=[r for _, r in BAD])
def test_each_bad_record_kind_reports_its_line(tmp_path, row, reason):
    rows = [GOOD[1], GOOD[2], row, GOOD[3]]  # the bad one on line 3
    with pytest.raises(DataError) as err:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    problems = err.value.problems
    assert problems and all(p.location.startswith("line 3") for p in problems), [p.render() for p in problems]
    assert any(reason in p.message for p in problems), [p.render() for p in problems]
    assert "line 3" in str(err.value) and reason in str(err.value)


def test_all_bad_records_are_collected_not_just_the_first(tmp_path):
    rows = [GOOD[0]] + [row for row, _ in BAD] + [GOOD[1]]
    with pytest.raises(DataError) as err:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    bad_lines = {p.location.split(":")[0] for p in err.value.problems}
    assert bad_lines == {f"line {i + 2}" for i in range(len(BAD))}


def test_blank_lines_are_skipped_but_line_numbers_stay_true(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD[1]) + "\n\n\n" + "{broken\n")
    with pytest.raises(DataError) as err:
        load_records(path)
    assert [p.location for p in err.value.problems] == ["line 4"]


def test_json_array_reports_indices_and_json_lines_in_a_json_file(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([GOOD[1], {"prompt": "p"}, GOOD[2]], indent=2))
    with pytest.raises(DataError) as err:
        load_records(arr)
    assert [p.location for p in err.value.problems] == ["index 1"]
    lines = write_jsonl(tmp_path / "l.json", GOOD)
    assert len(load_records(lines)) == len(GOOD)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(GOOD[1], indent=2))
    assert load_records(one)[0].shape == "prompt_completion"


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"prompt": "p", "completion": "c"},\n {"prompt": \n]')
    with pytest.raises(DataError) as err:
        load_records(path)
    assert err.value.problems[0].location == "line 4"


def test_parquet_reading_with_nested_messages_and_bad_rows(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError) as err:
        load_records(tmp_path / "d.parquet")
    assert [p.location for p in err.value.problems] == ["index 1: messages[1]"]
    pq.write_table(pa.Table.from_pylist(rows[:1] + [{"messages": rows[0]["messages"]}]), tmp_path / "ok.parquet")
    records = load_records(tmp_path / "ok.parquet")
    assert [r.location for r in records] == ["index 0", "index 1"]
    assert records[0].messages[1] == {"role": "assistant", "content": "hello"}


def test_file_uri_and_fsspec_uri(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    assert len(load_records(path.as_uri())) == len(GOOD)
    import fsspec

    with fsspec.open("memory://bucket/d.jsonl", "wb") as fh:
        fh.write(path.read_bytes())
    assert [r.shape for r in load_records("memory://bucket/d.jsonl")] == [r.shape for r in load_records(path)]


def test_uri_without_filesystem_library_names_what_to_install():
    with pytest.raises(DataError) as err:
        load_records("abfs://container/train.jsonl")
    assert "adlfs" in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_a_non_utf8_line_is_reported_with_its_number_and_the_rest_still_checked(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD[0]).encode(), b'{"prompt": "caf\xe9", "completion": "x"}', b"{broken",
             json.dumps({"prompt": "p"}).encode(), json.dumps(GOOD[1]).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as err:
        load_records(path)
    by_line = {p.location: p.message for p in err.value.problems}
    assert set(by_line) == {"line 2", "line 3", "line 4"}
    assert "not UTF-8" in by_line["line 2"] and "0xe9" in by_line["line 2"] and "column 16" in by_line["line 2"]
    assert "invalid JSON" in by_line["line 3"] and "completion" in by_line["line 4"]


def test_a_non_utf8_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "\xff", "completion": "c"}\n]\n')
    with pytest.raises(DataError) as err:
        load_records(path)
    assert [(p.location, p.message) for p in err.value.problems] == [("line 3", "not UTF-8 text")]
