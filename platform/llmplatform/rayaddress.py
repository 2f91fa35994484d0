"""`RAY_ADDRESS` (and `--ray-address`) in either of Ray's two forms, for every command.

A Ray cluster has two addresses: its GCS (`HOST:6379`, what `ray.init` and so Serve connect to)
and the Jobs API on its dashboard (`http://HOST:8265`, what job submission talks to). Whichever
one a user has, `parse(text)` gives both, deriving the missing one on the same host with Ray's
default ports. A Ray Client address (`ray://HOST:10001`) and `auto` go to `ray.init` unchanged;
they name no Jobs API, so `jobs_url` refuses them. Pure: nothing connects.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from llmplatform.errors import PlatformError

ENV = "RAY_ADDRESS"
GCS_PORT = 6379        # Ray's default GCS port (`ray start --head --port`)
DASHBOARD_PORT = 8265  # Ray's default dashboard / Jobs API port
FORMS = f"a Jobs API URL like http://HOST:{DASHBOARD_PORT} or a GCS address like HOST:{GCS_PORT}"


@dataclass(frozen=True)
class RayAddress:
    given: str
    gcs_address: str      # for ray.init(address=...): HOST:PORT, or a ray:// / auto address as given
    jobs_url: str | None  # the Jobs API base URL; None for ray:// and auto


def parse(text: str | None, source: str = ENV, error: type[PlatformError] = PlatformError) -> RayAddress:
    """Both addresses of the cluster `text` names; `error` (naming `source` and both accepted
    forms) when it is empty or neither form."""
    given = (text or "").strip()
    if given == "auto" or given.startswith("ray://"):
        return RayAddress(given, given, None)
    if given.startswith(("http://", "https://")):
        parts = urlsplit(given)
        if parts.hostname and not parts.path.strip("/"):
            return RayAddress(given, f"{parts.hostname}:{GCS_PORT}", given.rstrip("/"))
    elif given and "://" not in given and "/" not in given:
        host, sep, port = given.rpartition(":")
        if not sep:  # a bare host: Ray's default GCS port
            host, port = given, str(GCS_PORT)
        if host and port.isdigit():
            return RayAddress(given, f"{host}:{port}", f"http://{host}:{DASHBOARD_PORT}")
    raise error(f"{source} {given!r} is not a Ray address: use {FORMS}" if given else f"{source} is not set: set it to {FORMS}")


def jobs_url(text: str | None, source: str = ENV, error: type[PlatformError] = PlatformError) -> str:
    """The Jobs API URL of the cluster `text` names (either form); ray:// and auto are refused."""
    address = parse(text, source, error)
    if address.jobs_url is None:
        raise error(f"{source} {address.given!r} names no Ray Jobs API (a Ray Client or auto address reaches ray.init only): "
                    f"for job submission use {FORMS}")
    return address.jobs_url

