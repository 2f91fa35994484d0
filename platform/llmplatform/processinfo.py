"""Who a process is, portably: the owner of a listening port, a PID's name and ancestry (psutil).

psutil reads /proc on Linux and the kernel's process tables on macOS, so nothing here depends on
the OS. On macOS listing every socket needs root; then each process this user may inspect is
asked for its own sockets instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class ProcessOwner:
    """A process holding a port: pid, name, command line and the PIDs of its ancestors."""

    pid: int
    name: str
    cmdline: tuple[str, ...] = ()
    ancestors: tuple[int, ...] = field(default=())

    def describe(self) -> str:
        """`python -m http.server 8000` style, cut to 120 characters; the name if argv is hidden."""
        text = " ".join(self.cmdline) or self.name
        return text if len(text) <= 120 else text[:117] + "..."


def _listening_pids(port: int, connections: list) -> list[int]:
    """PIDs with a socket bound to local `port`, listeners first (TIME_WAIT leftovers have no pid)."""
    hits = [c for c in connections if c.laddr and c.laddr.port == port and c.pid]
    hits.sort(key=lambda c: c.status != psutil.CONN_LISTEN)
    return [c.pid for c in hits]


def _all_connections() -> list:
    try:
        return psutil.net_connections(kind="inet")
    except psutil.AccessDenied:  # macOS without root: ask process by process
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                found += _with_pid(proc)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return found


def _with_pid(proc: psutil.Process) -> list:
    """Per-process connections carry no pid field; add it so both paths look alike."""
    conns = proc.net_connections(kind="inet")
    return [_PidConnection(c.laddr, c.status, proc.pid) for c in conns]


@dataclass(frozen=True)
class _PidConnection:
    laddr: tuple
    status: str
    pid: int


def describe_pid(pid: int) -> ProcessOwner | None:
    """Name, argv and ancestors of `pid`, or None when it is gone."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            name = proc.name()
            try:
                cmdline = tuple(proc.cmdline())
            except (psutil.AccessDenied, psutil.ZombieProcess):
                cmdline = ()
            ancestors = tuple(p.pid for p in proc.parents())
    except psutil.NoSuchProcess:
        return None
    return ProcessOwner(pid, name, cmdline, ancestors)


def port_owner(port: int) -> ProcessOwner | None:
    """The process holding local TCP `port`, or None when none this user can see holds it."""
    for pid in _listening_pids(port, _all_connections()):
        owner = describe_pid(pid)
        if owner is not None:
            return owner
    return None
