"""The CPU partition of a GPU-less local stack: planning (pure), the env contract, and moving processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmplatform import cpus
from llmplatform.errors import StackError
from llmplatform.stack.ray_head import head_env


def test_cpu_lists_parse_and_format_like_taskset():
    assert cpus.parse_cpu_list("0-3,6, 8-9") == (0, 1, 2, 3, 6, 8, 9)
    assert cpus.format_cpu_list([9, 8, 6, 3, 2, 1, 0]) == "0-3,6,8-9"
    assert cpus.format_cpu_list([1]) == "1"
    for bad in ("", "a", "3-", "5-2", "1,,2"):
        with pytest.raises(ValueError):
            cpus.parse_cpu_list(bad)


def test_auto_keeps_the_last_cpu_per_eight_for_the_front_end_and_is_off_with_a_gpu():
    assert cpus.plan("auto", [0, 1], gpu=False) == cpus.CpuPartition(front=(1,), model=(0,))
    sixteen = cpus.plan("auto", range(16), gpu=False)
    assert sixteen.front == (14, 15) and sixteen.model == tuple(range(14)) and sixteen.all == tuple(range(16))
    assert cpus.plan("auto", [2, 5, 7], gpu=False) == cpus.CpuPartition(front=(7,), model=(2, 5))  # a taskset/cgroup mask
    assert cpus.plan("auto", range(8), gpu=True) is None
    assert cpus.plan("auto", [0], gpu=False) is None
    assert cpus.plan("off", range(8), gpu=False) is None


def test_named_front_cpus_are_checked_against_what_the_process_may_use():
    assert cpus.plan("6-7", range(8), gpu=True) == cpus.CpuPartition(front=(6, 7), model=tuple(range(6)))  # explicit wins
    with pytest.raises(StackError, match=r"--cpu-partition '9'.*CPU\(s\) 9 are not available.*available: 0-7"):
        cpus.plan("9", range(8), gpu=False)
    with pytest.raises(StackError, match="leaves no CPU for the model"):
        cpus.plan("0-1", [0, 1], gpu=False)
    with pytest.raises(StackError, match="Use auto, off, or the front-end CPUs"):
        cpus.plan("half", [0, 1], gpu=False)


def test_workers_read_the_partition_from_the_env_the_head_was_given():
    part = cpus.CpuPartition(front=(6, 7), model=(0, 1, 2, 3, 4, 5))
    env = head_env(part, "/home/u/.llm-platform/ray/auth_token")
    assert env[cpus.FRONT_ENV] == "6-7" and env[cpus.MODEL_ENV] == "0-5" and env["RAY_AUTH_MODE"] == "token"
    assert cpus.from_env(env) == part
    cleared = head_env(None, "/t")  # a variable left in the caller's shell must not reach the workers
    assert cleared[cpus.FRONT_ENV] is None and cleared[cpus.MODEL_ENV] is None
    assert cpus.from_env({}) is None and cpus.from_env({cpus.FRONT_ENV: "1", cpus.MODEL_ENV: "x"}) is None


def test_gpu_device_nodes_turn_auto_off(tmp_path):
    assert not cpus.gpu_present(tmp_path)
    (tmp_path / "nvidiactl").touch()
    assert not cpus.gpu_present(tmp_path)  # the control node alone is no GPU
    (tmp_path / "nvidia0").touch()
    assert cpus.gpu_present(tmp_path)


needs_two = pytest.mark.skipif(not cpus.affinity_supported() or len(cpus.allowed_cpus()) < 2, reason="needs 2 CPUs and CPU affinity (Linux)")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice and RLIMIT_NICE are Linux's")
needs_affinity = pytest.mark.skipif(not cpus.affinity_supported(), reason="CPU affinity is Linux-only")

CHILD = r"""
import json, os, subprocess, sys
from llmplatform import cpus
before = os.sched_getaffinity(0)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
found = cpus.descendants(os.getpid())
cpus.use_all_cpus()
print(json.dumps([sorted(before), sorted(os.sched_getaffinity(0)), [p for p, _ in found] == [grandchild.pid]]), flush=True)
grandchild.kill(); grandchild.wait()
"""


@needs_two
def test_a_child_started_on_the_front_cpus_widens_itself_for_batch_work():
    allowed = sorted(os.sched_getaffinity(0))
    part = cpus.CpuPartition(front=(allowed[-1],), model=tuple(allowed[:-1]))
    out = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **part.env()}, preexec_fn=cpus.pin_child(part.front),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    before, after, found_child = json.loads(out)
    assert before == [allowed[-1]]  # started on the front CPU only
    assert after == allowed and found_child  # now on all of them; its child was found


@pytest.fixture
def four_threads():
    """A child process with 4 threads (killed afterwards)."""
    proc = subprocess.Popen([sys.executable, "-c", "import threading, time\n"
                             "[threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(3)]\n"
                             "print('up', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@needs_two
def test_set_process_cpus_moves_every_thread(four_threads):
    target = {sorted(os.sched_getaffinity(0))[0]}
    cpus.set_process_cpus(four_threads.pid, target)
    tids = cpus.thread_ids(four_threads.pid)
    assert len(tids) >= 4 and all(os.sched_getaffinity(t) == target for t in tids)


@needs_affinity
def test_a_refused_move_leaves_the_thread_where_it_was():
    before = os.sched_getaffinity(0)
    assert not cpus.set_thread_cpus({4096})  # no such CPU
    assert os.sched_getaffinity(0) == before


@linux_only
def test_set_process_nice_sets_every_thread(four_threads):
    assert cpus.set_process_nice(four_threads.pid, 7)  # a higher nice needs no privilege
    tids = cpus.thread_ids(four_threads.pid)
    assert len(tids) >= 4 and all(os.getpriority(os.PRIO_PROCESS, t) == 7 for t in tids)
    four_threads.kill()
    four_threads.wait()
    assert not cpus.set_process_nice(four_threads.pid, 0)  # gone: reported, not raised


REFUSED_NICE = r'''
import os, resource
from llmplatform import cpus
os.nice(5)
resource.setrlimit(resource.RLIMIT_NICE, (0, 0))  # no nice below the current one...
if os.getuid() == 0:
    os.setuid(65534)  # ...and no CAP_SYS_NICE
print(cpus.set_process_nice(os.getpid(), -10), os.getpriority(os.PRIO_PROCESS, 0))
'''


@linux_only
def test_a_refused_priority_is_reported_and_leaves_the_process_as_it_was():
    """Without root, CAP_SYS_NICE or RLIMIT_NICE a lower nice is refused: the engine logs it and
    runs on (vLLM's scheduler keeps its priority)."""
    out = subprocess.run([sys.executable, "-c", REFUSED_NICE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "5"]
