"""The TCP sockets a set of processes listens on, read from /proc (no `ss` needed).

/proc/net/tcp{,6} lists every socket with its inode; /proc/PID/fd links to `socket:[INODE]`
for the sockets a process holds. A listener is a row in state 0A (LISTEN).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    host: str  # "0.0.0.0", "127.0.0.1", "::", "10.0.0.5", ...
    port: int
    pid: int
    command: str

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback


def _hex_address(field: str) -> tuple[str, int]:
    """`0100007F:1F90` (little-endian 32-bit words) -> ("127.0.0.1", 8080)."""
    raw, port = field.split(":")
    data = b"".join(bytes.fromhex(raw[i:i + 8])[::-1] for i in range(0, len(raw), 8))
    addr = ipaddress.ip_address(data)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr), int(port, 16)


def _listening_inodes() -> dict[int, tuple[str, int]]:
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == LISTEN:
                found[int(cols[9])] = _hex_address(cols[1])
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except (FileNotFoundError, PermissionError):
        pass
    return inodes


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def listeners_of(pids) -> list[Listener]:
    """Every TCP listener held by one of `pids`."""
    inodes = _listening_inodes()
    out = set()
    for pid in pids:
        for inode in _socket_inodes(pid) & inodes.keys():
            host, port = inodes[inode]
            out.add(Listener(host, port, pid, _command(pid)))
    return sorted(out, key=lambda x: (x.port, x.host, x.pid))
