"""`platformctl data validate`: exit codes, line-numbered problems, JSON output, specs."""

from __future__ import annotations

import json

import pytest
import yaml

from llmplatform.cli.main import main

from datatest_helpers import chat, write_jsonl


@pytest.fixture()
def good(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [chat("What is 2 + 3?", "5", system="Be brief."), {"prompt": "Spell cat", "completion": "c a t"}])


def test_valid_file_prints_stats_and_preview(good, tiny_dir, capsys):
    assert main(["data", "validate", str(good), "--tokenizer", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "records         2" in out and "p95" in out and "trained tokens" in out
    assert "[/INST][[ 5 </s>]]" in out and "valid" in out


def test_bad_records_exit_1_with_every_line_and_reason(tmp_path, tiny_dir, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat("q", "a"), "{oops", {"messages": [{"role": "bot", "content": "x"}]}, {"prompt": "p", "completion": ""}])
    assert main(["data", "validate", str(path), "--tokenizer", str(tiny_dir)]) == 1
    err = capsys.readouterr().err
    assert "3 bad record(s)" in err
    assert "line 2: invalid JSON" in err and "line 3: messages[0]: unknown role 'bot'" in err and "line 4: empty assistant turn" in err


def test_json_output_for_scripts(tmp_path, good, tiny_dir, capsys):
    assert main(["data", "validate", str(good), "--tokenizer", str(tiny_dir), "--max-seq-length", "20", "-o", "json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["valid"] is True and body["records"] == 2 and body["max_len"] == 20 and len(body["sha256"]) == 64
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 1, "completion": "x"}])
    assert main(["data", "validate", str(bad), "--tokenizer", str(tiny_dir), "--output", "json"]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["valid"] is False and body["problems"][0]["location"] == "line 1" and "non-text" in body["problems"][0]["reason"]


def test_spec_file_uses_its_files_and_length(tmp_path, good, tiny_dir, capsys):
    val = write_jsonl(tmp_path / "val.jsonl", [chat("hi", "hello")])
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "job", "base_model": str(tiny_dir),
                                    "data": {"train": str(good), "validation": str(val), "max_seq_length": 24}}))
    assert main(["data", "validate", str(spec), "-o", "json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["max_len"] == 24 and body["validation"]["records"] == 1 and body["source"] == str(good)


def test_spec_with_llama2_tiny_uses_the_local_tiny_tokenizer(tmp_path, good, monkeypatch, capsys):
    monkeypatch.setenv("PLATFORM_HOME", str(tmp_path / "home"))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "job", "base_model": "llama2-tiny", "data": {"train": str(good)}}))
    assert main(["data", "validate", str(spec)]) == 0
    assert "held out for evaluation" in capsys.readouterr().out


def test_catalog_llama2_without_local_tokenizer_suggests_flag(good, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["data", "validate", str(good), "--tokenizer", "llama2-7b"]) == 1
    err = capsys.readouterr().err
    assert "meta-llama/Llama-2-7b-hf" in err and "--tokenizer DIR" in err
