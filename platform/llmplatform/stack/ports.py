"""TCP ports for the local stack: find a free one, and check that a wanted one is free.

Everything binds 127.0.0.1. A port counts as taken when a socket cannot bind it with
SO_REUSEADDR, i.e. something listens on it or holds it exclusively (TIME_WAIT leftovers of a
stopped server do not count, so a stack can restart on its old ports at once).
"""

from __future__ import annotations

import socket

from llmplatform.errors import PortInUseError

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A port the OS reports free right now (bind port 0). Racy by nature: use it promptly."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when a server could bind `host:port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def check_ports_free(wanted: list[tuple[str, int, str]], host: str = HOST) -> None:
    """Raise PortInUseError for the first taken port of `wanted` = [(component, port, flag)]."""
    for component, port, flag in wanted:
        if not port_is_free(port, host):
            raise PortInUseError(
                f"port {port} on {host} is already in use, so the {component} cannot start there. "
                f"Stop whatever holds it, or pick another port with `platformctl up {flag} <port>`. "
                "Nothing was started."
            )
