"""Key identities in the keys file, the per-key token buckets, and the usage store behind
`platformctl usage` (real SQLite through SQLAlchemy, the real CLI entry point)."""

from __future__ import annotations

import json
import time

import pytest

from llmplatform.cli.main import main
from llmplatform.serving.keys import KeyIdentity, KeysFile, KeysFormatError, add_key, hash_key, parse_keys_table
from llmplatform.serving.limits import TokenBuckets, retry_after_header
from llmplatform.serving.usage import UsageRecorder, UsageStore, usage_db_url


def test_a_keys_file_line_names_a_key_and_its_limits_and_old_lines_still_work() -> None:
    h = hash_key("team-a-key")
    table = parse_keys_table(f"# teams\nsha256:{h} name=team-a rpm=60 tpm=20000\nplain-old-key\n"
                             f"sha256:{hash_key('hashed-old')}\n")
    assert table[h] == KeyIdentity("team-a", 60, 20000)
    assert table[hash_key("plain-old-key")] == KeyIdentity(f"key-{hash_key('plain-old-key')[:8]}")
    assert table[hash_key("hashed-old")].name == f"key-{hash_key('hashed-old')[:8]}" and not table[hash_key("hashed-old")].limited
    assert set(parse_keys_table("a, b name=bee")) == {hash_key("a"), hash_key("b")}  # the env's comma form


def test_every_bad_line_is_reported_with_its_number_and_the_fix() -> None:
    with pytest.raises(KeysFormatError) as err:
        parse_keys_table("good\nsha256:abc name=x\nk2 rpm=fast\nk3 team=a\n", "keys.txt")
    msg = str(err.value)
    assert "keys.txt line 2" in msg and "64 hex" in msg and "line 3" in msg and "rpm=fast" in msg and "line 4" in msg and "team=a" in msg


def test_keys_add_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sha256:" + hash_key("existing") + "\n")
    assert main(["keys", "add", "team-b", "--file", str(keys), "--rpm", "10", "--tpm", "500"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-") and key not in keys.read_text()
    assert parse_keys_table(keys.read_text())[hash_key(key)] == KeyIdentity("team-b", 10, 500)
    assert main(["keys", "add", "team-b", "--file", str(keys)]) == 1
    assert "already has a key named 'team-b'" in capsys.readouterr().err
    assert main(["keys", "add", "team-b", "--file", str(keys), "--rotate"]) == 0  # a second key, same identity and limits
    rotated = capsys.readouterr().out.strip()
    table = parse_keys_table(keys.read_text())
    assert table[hash_key(rotated)] == table[hash_key(key)] == KeyIdentity("team-b", 10, 500) and rotated != key
    fresh = tmp_path / "new" / "keys.txt"
    add_key(fresh, "x")
    assert fresh.stat().st_mode & 0o777 == 0o600


def test_the_keys_file_is_stated_at_most_once_a_second_but_a_new_key_works_at_once(tmp_path, monkeypatch) -> None:
    path = tmp_path / "keys"
    path.write_text("first\n")
    keys = KeysFile(str(path))
    stats = []
    real_stat = type(path).stat
    monkeypatch.setattr(type(path), "stat", lambda self, *a, **k: stats.append(1) or real_stat(self, *a, **k))
    for _ in range(100):
        assert keys.lookup(hash_key("first")) is not None
    assert len(stats) == 1
    path.write_text("first\nsecond\n")
    assert keys.lookup(hash_key("second")) is not None  # unknown: looked up again at once
    path.write_text("second\n")
    assert keys.lookup(hash_key("first")) is not None  # a removed key lasts until the next check...
    time.sleep(1.05)
    assert keys.lookup(hash_key("first")) is None  # ...at most a second


def test_token_buckets_admit_a_minutes_burst_then_the_rate_and_say_when_to_retry() -> None:
    b = TokenBuckets()
    assert all(b.admit("a", 6, None, 100.0) is None for _ in range(6))
    wait = b.admit("a", 6, None, 100.0)
    assert wait == pytest.approx(10.0) and retry_after_header(wait) == "10"  # 6/min: one every 10 s
    assert b.admit("other", 6, None, 100.0) is None  # other keys are unaffected
    assert b.admit("a", 6, None, 110.0) is None and b.admit("a", 6, None, 110.0) is not None
    # tokens: charged when a request ends; admitted while the bucket is not in debt
    assert b.admit("t", None, 600, 0.0) is None
    b.charge("t", 900, 600, 0.0)  # one big request: 300 in debt
    assert b.admit("t", None, 600, 0.0) == pytest.approx(30.1)  # (300 + 1) tokens at 10/s
    assert b.admit("t", None, 600, 30.2) is None


def test_usage_tallies_reach_the_store_and_platformctl_usage_groups_them(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PLATFORM_HOME", str(tmp_path))
    monkeypatch.delenv("PLATFORM_USAGE_DB", raising=False)
    url = usage_db_url()
    assert url == f"sqlite:///{tmp_path}/usage.db" and usage_db_url({"PLATFORM_USAGE_DB": "off"}) is None
    r1 = UsageRecorder(url, "chat", "r1", gpus=1.0, flush_s=3600)
    r2 = UsageRecorder(url, "chat", "r2", flush_s=3600)  # another replica, same store
    r1.record("team-a", "llama2-tiny", "", 10, 5)
    r1.record("team-a", "llama2-tiny", "support-bot", 7, 3)
    r2.record("team-b", "llama2-tiny", "", 4, 2)
    r2.record("team-b", "llama2-tiny", "", error=True)
    time.sleep(0.2)
    r1.close(), r2.close()
    assert main(["usage", "--by", "key", "--output", "json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["team-a"] == {"key": "team-a", "requests": 2, "prompt_tokens": 17, "completion_tokens": 8, "errors": 0}
    assert rows["team-b"] == {"key": "team-b", "requests": 2, "prompt_tokens": 4, "completion_tokens": 2, "errors": 1}
    assert main(["usage", "--by", "adapter"]) == 0
    table = capsys.readouterr().out
    assert "support-bot" in table and "(base)" in table and table.splitlines()[0].split() == [
        "ADAPTER", "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "ERRORS"]
    assert main(["usage", "--by", "deployment", "-o", "json"]) == 0
    (dep,) = json.loads(capsys.readouterr().out)
    assert dep["requests"] == 4 and 0.2 <= dep["replica_gpu_seconds"] < 5  # r1's one GPU while it lived
    assert main(["usage", "--since", "1s", "--by", "team"]) == 1
    assert "--by 'team'" in capsys.readouterr().err


def test_a_failed_write_keeps_the_tally_for_the_next_flush(tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    rec = UsageRecorder(f"sqlite:///{blocker}/usage.db", "chat", flush_s=3600)
    rec.record("k", "m", "", 3, 4)
    rec.flush()  # fails: the parent is a file
    rec._url = f"sqlite:///{tmp_path}/usage.db"
    rec.close()
    store = UsageStore(f"sqlite:///{tmp_path}/usage.db")
    assert store.report(0, "key") == [{"key": "k", "requests": 1, "prompt_tokens": 3, "completion_tokens": 4, "errors": 0}]


def test_an_engine_replica_counts_the_accelerators_of_its_placement_group(tmp_path, monkeypatch) -> None:
    from llmplatform.resolve import Facts, resolve
    from llmplatform.serving.usage import gpu_seconds_recorder, replica_gpus
    from llmplatform.specs import parse_spec

    monkeypatch.setenv("PLATFORM_USAGE_DB", f"sqlite:///{tmp_path}/usage.db")
    spec = {"name": "chat", "engine": "hf", "model": {"base": "llama2-tiny"}, "tensor_parallel": 2,
            "resources": {"gpus_per_shard": 1, "accelerator_resource": "fake_gpu"}}
    plan = resolve(parse_spec("serve", spec), Facts()).require()
    assert replica_gpus(plan) == 2.0
    rec = gpu_seconds_recorder(plan, "r1")
    time.sleep(0.3)
    rec.close()
    (row,) = UsageStore(f"sqlite:///{tmp_path}/usage.db").report(0, "deployment")
    assert row["deployment"] == "chat" and row["requests"] == 0 and 0.6 <= row["replica_gpu_seconds"] < 10  # 2 GPUs x ~0.3 s
    cpu_plan = resolve(parse_spec("serve", {"name": "c", "engine": "hf", "model": {"base": "llama2-tiny"}}), Facts()).require()
    assert replica_gpus(cpu_plan) == 0.0 and gpu_seconds_recorder(cpu_plan, "r") is None


def test_replicas_starting_together_on_a_new_store_both_get_their_tables(tmp_path) -> None:
    import threading

    for i in range(5):  # create_all's check-then-CREATE races when two replicas start at once
        url, errors = f"sqlite:///{tmp_path}/race{i}.db", []

        def open_store():
            try:
                UsageStore(url).close()
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_store) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
