"""Child processes the stack owns: start each in its own session, check it, stop it by group.

A component is started with `start_new_session=True`, so its PID is also its process-group id
(pgid) and session id (sid). Everything it spawns (uvicorn workers, raylet, GCS, dashboard)
stays in that group; Ray's task workers get their own process groups but stay in the session,
so "the group" here means every live process whose session id is the leader's PID. We record
the leader's start time (psutil's create time); before signalling we check that the PID still
belongs to that same process, so a stale state file can never make us kill a stranger.
Stopping sends SIGTERM to the group, every session member and every descendant of the leader,
waits, then SIGKILLs what is left. Never by name.

Processes are inspected through psutil and os.getpgid/os.getsid, so this runs on Linux and
macOS alike (no /proc reads).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import psutil

from llmplatform.errors import StackError
from llmplatform.cpus import pin_child

# State files written before psutil recorded the start time in clock ticks since boot (Linux
# /proc/<pid>/stat field 22); a create time in seconds since the epoch is always above this.
_EPOCH_FLOOR = 1e9
logger = logging.getLogger(__name__)
START_TIME_TOLERANCE = 0.05  # seconds; psutil derives the same create time each call, this only absorbs rounding


@dataclass(frozen=True)
class ProcessRecord:
    """A started process group: leader pid (== pgid), its start time, command, log file."""

    pid: int
    pgid: int
    start_time: float  # psutil create time, seconds since the epoch (older state files: clock ticks since boot)
    command: list[str]
    log: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProcessRecord":
        return cls(
            pid=int(data["pid"]),
            pgid=int(data["pgid"]),
            start_time=float(data["start_time"]),
            command=list(data.get("command", [])),
            log=str(data.get("log", "")),
        )


def _process(pid: int) -> psutil.Process | None:
    """The live (non-zombie) process `pid`, or None."""
    try:
        proc = psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    try:
        return None if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) else proc
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's process (macOS): alive, and never one we started
        return proc


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a live (non-zombie) process."""
    return _process(pid) is not None


def proc_start_time(pid: int) -> float | None:
    """The process's create time in seconds since the epoch; None when there is no such process."""
    proc = _process(pid)
    try:
        return round(proc.create_time(), 2) if proc else None
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def same_start(recorded: float, proc: psutil.Process) -> bool:
    """Whether `proc` started when `recorded` says (so its PID was not reused since)."""
    try:
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False
    if recorded >= _EPOCH_FLOOR:
        return abs(created - recorded) <= START_TIME_TOLERANCE
    if not hasattr(os, "sysconf"):  # an old Linux-format record read on an OS without sysconf
        return False
    ticks = (created - psutil.boot_time()) * os.sysconf("SC_CLK_TCK")
    return abs(ticks - recorded) <= 1.5  # psutil's create time is boot time + these ticks, to float precision


def is_ours(record: ProcessRecord) -> bool:
    """True when the leader PID is alive and is still the very process we started."""
    proc = _process(record.pid)
    return proc is not None and same_start(record.start_time, proc)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) PIDs whose process group or session is `pgid` (a setsid leader's PID)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        try:
            if os.getpgid(proc.pid) == pgid or os.getsid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):  # gone, or (macOS) in a session we may not query
            continue
    return members


def leader_descendants(record: ProcessRecord) -> list[psutil.Process]:
    """Processes below the leader (children that left its session too), when it is still ours.
    psutil refuses to signal one of them whose PID was reused meanwhile."""
    proc = _process(record.pid)
    if proc is None or not same_start(record.start_time, proc):
        return []
    try:
        return proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def group_is_ours(record: ProcessRecord) -> bool:
    """Whether signalling `record.pgid` hits only our processes.

    Either the leader is still ours, or the leader is gone entirely and members of its group
    remain (the kernel never reuses a PID as a new group id while that group has members).
    A leader PID now held by a different process means the group is not ours.
    """
    if is_ours(record):
        return True
    if _process(record.pid) is not None:
        return False  # PID reused by another process
    return bool(group_members(record.pgid))


def start_process(command: list[str], log_path: Path, env: dict[str, str | None] | None = None,
                  cpus: Iterable[int] | None = None) -> ProcessRecord:
    """Start `command` in a new session with stdout+stderr appended to `log_path`.

    `env` is layered over os.environ; a None value removes that variable. `cpus`: the CPUs the
    process (and everything it starts) runs on.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **(env or {})}
    child_env = {k: v for k, v in child_env.items() if v is not None}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,  # setsid: pid == pgid == sid, we own the whole group
            close_fds=True,
            preexec_fn=pin_child(cpus) if cpus else None,
        )
    start = proc_start_time(proc.pid)
    if start is None:  # exited at once; keep a record so the caller reports its log
        start = -1
    logger.info("started pid %d (session leader)%s: %s; log %s", proc.pid, f" on CPUs {sorted(cpus)}" if cpus else "",
             " ".join(command), log_path)
    return ProcessRecord(pid=proc.pid, pgid=proc.pid, start_time=start, command=command, log=str(log_path))


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our own child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_groups(records: list[ProcessRecord], timeout: float = 5.0) -> list[bool]:
    """SIGTERM each record's process group together, SIGKILL what is left after `timeout` s.

    Returns, per record, whether its group was ours (and so was signalled). A group that is not
    ours (the PID was reused) is left alone.
    """
    ours = [group_is_ours(r) for r in records]
    targets = [r for r, mine in zip(records, ours) if mine]
    below = {r.pid: leader_descendants(r) for r in targets}  # found before the leader exits and its tree is lost
    for record, mine in zip(records, ours):
        if mine:
            logger.info("stopping process group %d: %d session members, %d descendants", record.pgid,
                     len(group_members(record.pgid)), len(below[record.pid]))
        else:
            logger.info("leaving pid %d alone: it is no longer the process we started", record.pid)
    for record in targets:
        _signal_group(record.pgid, signal.SIGTERM, below[record.pid])
    for sig, wait in ((signal.SIGKILL, timeout), (None, 5.0)):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for record in records:
                _reap(record.pid)
            targets = [r for r in targets if group_members(r.pgid) or any(_alive(p) for p in below[r.pid])]
            if not targets:
                break
            time.sleep(0.2)
        if sig is not None:
            for record in targets:
                _signal_group(record.pgid, sig, below[record.pid])
    for record in records:
        _reap(record.pid)
    return ours


def stop_group(record: ProcessRecord, timeout: float = 5.0) -> bool:
    """Stop one process group (see `stop_groups`)."""
    return stop_groups([record], timeout)[0]


def _signal_group(pgid: int, sig: int, below: list[psutil.Process] = ()) -> None:
    """Signal the process group, then any session member outside it (e.g. Ray task workers), then
    the leader's descendants that left the session."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    for pid in group_members(pgid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    for proc in below:
        try:
            proc.send_signal(sig)  # psutil checks the PID still names the same process
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass


def log_tail(path: str | Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file (empty string when it does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def http_ok(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    """True when GET `url` answers 2xx within `timeout` seconds (no proxies: all local)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(
    waiting: dict[str, tuple[ProcessRecord, Callable[[], bool]]],
    timeout: float,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Poll each component's health check until all pass.

    `waiting` maps a component name to (its process record, a no-argument health check).
    Raises StackError naming the component, with the tail of its log, when its process dies or
    when `timeout` seconds pass first.
    """
    pending = dict(waiting)
    start = time.monotonic()
    last_note = 0.0
    while pending:
        for name, (record, check) in list(pending.items()):
            if check():
                del pending[name]
                if progress:
                    progress(f"{name} is healthy ({time.monotonic() - start:.0f}s)")
            elif not is_ours(record) and not check():
                raise StackError(
                    f"the {name} process (pid {record.pid}) exited while starting. "
                    f"Last lines of {record.log}:\n{log_tail(record.log)}"
                )
        if not pending:
            return
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            name, (record, _) = next(iter(pending.items()))
            raise StackError(
                f"the {name} did not become healthy within {timeout:.0f}s. "
                f"Last lines of {record.log}:\n{log_tail(record.log)}"
            )
        if progress and elapsed - last_note >= 10:
            last_note = elapsed
            progress(f"waiting for {', '.join(pending)} ({elapsed:.0f}s)")
        time.sleep(0.5)
