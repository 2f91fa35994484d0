"""Synthetic instruction tasks: held-out items stay out of train (and pretraining); shapes parse."""

from __future__ import annotations

import json
import re

import pytest

from llmplatform.errors import PlatformError
from llmplatform.tiny import pretrain, tasks, text


@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_items_never_appear_in_train(task, seed):
    train, held = tasks.make_split(task, 2000, 200, seed)
    assert len(train) == 2000 and len(held) == 200
    train_q = {i.question for i in train}
    assert len(train_q) == 2000 and len({i.question for i in held}) == 200
    assert train_q.isdisjoint(i.question for i in held)
    # the split is a property of the item, not of the seed: no seed leaks eval items into train
    _, other_held = tasks.make_split(task, 10, 200, seed + 7)
    assert train_q.isdisjoint(i.question for i in other_held)


def test_answers_are_correct():
    train, held = tasks.make_split("addition", 50, 20)
    for item in train + held:
        a, b = map(int, re.findall(r"\d+", item.question))
        assert item.answer == str(a + b)
    for item in tasks.make_split("reverse", 50, 20)[1]:
        assert item.answer.split() == item.input.split()[::-1]
    assert text.number_words(2305) == "two thousand three hundred five"
    assert text.number_words(47) == "forty-seven"


def test_pretraining_corpus_leaves_out_held_out_sums_and_numbers():
    lines = pretrain.corpus()
    sums = [tuple(map(int, m)) for line in lines for m in re.findall(r"(\d+) (?:plus|\+) (\d+)", line)]
    assert len(sums) > 5000
    assert not any(tasks.addition_held_out(a, b) for a, b in sums)
    assert not any("[INST]" in line for line in lines)
    numbers = [int(m) for line in lines for m in re.findall(r"^(?:The number )?(\d+) is", line)]
    assert numbers and not any(tasks.number_words_held_out(n) for n in numbers)
    reversed_words = ["".join(m.split()) for line in lines for m in re.findall(r"\b((?:[a-z] )+[a-z]) (?:backwards|reversed|becomes)", line)]
    assert len(reversed_words) > 1000
    assert not any(tasks.reverse_held_out(w) for w in reversed_words)


@pytest.mark.parametrize("shape", tasks.SHAPES)
def test_written_datasets_parse_in_every_shape(shape, tmp_path):
    from llmplatform.data.records import load_records

    paths = tasks.write_task_dataset("addition", tmp_path, n_train=30, n_eval=10, seed=3, shape=shape)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 30
    records = load_records(paths["eval"])
    assert len(records) == 10 and {r.shape for r in records} == {shape}
    for rec in records:
        assert [m["role"] for m in rec.messages][-2:] == ["user", "assistant"]
        assert rec.messages[-1]["content"].isdigit()


def test_same_seed_same_files_other_seed_other_train(tmp_path):
    a = tasks.write_task_dataset("reverse", tmp_path / "a", 100, 20, seed=0)
    b = tasks.write_task_dataset("reverse", tmp_path / "b", 100, 20, seed=0)
    c = tasks.write_task_dataset("reverse", tmp_path / "c", 100, 20, seed=1)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()


def test_bad_task_shape_or_size_is_explained(tmp_path):
    with pytest.raises(PlatformError, match="addition"):
        tasks.write_task_dataset("division", tmp_path)
    with pytest.raises(PlatformError, match="alpaca"):
        tasks.write_task_dataset("addition", tmp_path, shape="csv")
    with pytest.raises(PlatformError, match="lower n_eval"):
        tasks.make_split("addition", 10, 1000)
