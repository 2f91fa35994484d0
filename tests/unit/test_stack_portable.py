"""The local stack off Linux: faked macOS (no CPU affinity call) and psutil process management.

The macOS branches run here by removing `os.sched_*affinity` and setting `sys.platform`, as
on a Mac; the process tests start real tiny processes and stop them through psutil.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llmplatform import cpus
from llmplatform.errors import StackError
from llmplatform.stack import lifecycle
from llmplatform.stack.processes import ProcessRecord, is_ours, pid_alive, start_process, stop_group

REPO = Path(__file__).resolve().parents[2]
# a parent whose child starts its own session (leaves the group and session), prints its pid, waits
SPAWNS_OWN_SESSION = ("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
                      "print(child.pid, flush=True); time.sleep(60)")


@pytest.fixture
def macos(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as on macOS: no sched_getaffinity/sched_setaffinity, sys.platform darwin."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")


def test_auto_partition_is_skipped_with_one_info_line(macos, caplog):
    assert not cpus.affinity_supported()
    with caplog.at_level(logging.INFO, logger="llmplatform.cpus"):
        assert cpus.plan_for_host("auto", gpu=False) is None
    lines = [r for r in caplog.records if r.name == "llmplatform.cpus"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "darwin" in lines[0].getMessage()
    assert cpus.plan_for_host("off", gpu=False) is None


def test_explicit_partition_is_an_error_naming_the_fix(macos):
    with pytest.raises(StackError, match=r"--cpu-partition '1'.*darwin.*auto or off"):
        cpus.plan_for_host("1", gpu=False)


def test_up_with_an_explicit_partition_starts_nothing_on_macos(macos, tmp_path):
    with pytest.raises(StackError, match="cannot pin processes"):
        lifecycle.up(home=tmp_path, cpu_partition="0", timeout=5)
    assert not (tmp_path / "stack.json").exists()


def test_cpu_helpers_are_no_ops_without_affinity(macos):
    assert cpus.allowed_cpus() == tuple(range(os.cpu_count()))
    assert cpus.pin_child([0]) is None  # Popen(preexec_fn=None): nothing pinned
    assert cpus.set_thread_cpus([0]) is False
    cpus.set_process_cpus(os.getpid(), [0])  # returns without touching anything


def test_nice_is_per_process_on_macos(macos):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert cpus.set_process_nice(child.pid, 9)
        assert psutil.Process(child.pid).nice() == 9
    finally:
        child.kill()
        child.wait()
    assert not cpus.set_process_nice(child.pid, 9)  # gone: reported, not raised


def test_a_component_starts_and_stops_without_affinity(macos, tmp_path):
    record = start_process([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "p.log", cpus=[0])
    try:
        assert is_ours(record)
    finally:
        assert stop_group(record, timeout=2)
    assert not pid_alive(record.pid)


def test_stop_reaches_descendants_that_left_the_session(tmp_path):
    record = start_process([sys.executable, "-c", SPAWNS_OWN_SESSION], tmp_path / "p.log")
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "p.log").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        escaped = int((tmp_path / "p.log").read_text().split()[0])
        assert pid_alive(escaped) and os.getsid(escaped) != record.pid  # outside the group and session
    finally:
        assert stop_group(record, timeout=2)
    deadline = time.monotonic() + 5
    while pid_alive(escaped) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(escaped), "a descendant outside the session outlived `down`"


def test_a_reused_pid_is_not_ours(tmp_path):
    record = start_process([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "p.log")
    try:
        assert isinstance(record.start_time, float) and abs(record.start_time - psutil.Process(record.pid).create_time()) < 0.05
        assert not is_ours(ProcessRecord(record.pid, record.pgid, record.start_time + 1, record.command, record.log))
    finally:
        stop_group(record, timeout=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="state files of older versions recorded Linux clock ticks")
def test_a_state_file_from_before_psutil_still_identifies_its_process(tmp_path):
    record = start_process([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "p.log")
    try:
        stat = Path(f"/proc/{record.pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # what the old code recorded
        old = ProcessRecord.from_dict({**record.to_dict(), "start_time": ticks})
        assert is_ours(old)
        assert not is_ours(ProcessRecord.from_dict({**record.to_dict(), "start_time": ticks + 100}))
    finally:
        stop_group(record, timeout=2)


def test_no_linux_only_calls_outside_cpus_py():
    """/proc reads and sched_*affinity live only in cpus.py's guarded functions (the docs' grep)."""
    pattern = re.compile(r"""["']/proc/|os\.sched_(get|set)affinity""")
    offenders = [f"{path.relative_to(REPO)}:{n}" for root in ("platform", "operators") for path in (REPO / root).rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line) and path.name != "cpus.py"]
    assert offenders == []
