"""Fail fast, in one line, when a service the CLI needs does not answer on its port.

MLflow's client retries a refused connection for minutes (urllib3 backoff, 254 s measured), and
`ray.init` waits on a dead GCS for as long; neither says which address it tried or what to do.
`require_reachable` opens one TCP connection (a few seconds at most) before the real client is
made and raises the caller's PlatformError naming the address and the fix. A service that accepts
the connection is left to its own client: this checks reachability, not health.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from llmplatform.errors import PlatformError

CONNECT_TIMEOUT_S = 3.0
DEFAULT_PORTS = {"http": 80, "https": 443, "ray": 10001}


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `http(s)://h:p/...`, `ray://h:p` or a bare `h:p`; None for anything not on
    the network (file paths, sqlite:, databricks, ...)."""
    if "://" not in address:
        address = f"tcp://{address}"
    parts = urlsplit(address)
    if parts.scheme not in (*DEFAULT_PORTS, "tcp") or not parts.hostname:
        return None
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return (parts.hostname, port) if port else None


def require_reachable(address: str, what: str, fix: str, error: type[PlatformError], timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise `error("cannot reach WHAT at ADDRESS (reason): FIX")` unless a TCP connection to it opens."""
    target = host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc)).lower()
        raise error(f"cannot reach {what} at {address} ({reason}): {fix}") from exc
