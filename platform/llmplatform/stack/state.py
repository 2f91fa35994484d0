"""The stack's runtime state file, `<PLATFORM_HOME>/stack.json`.

It records, per component, the process group we started (PID, pgid, start time), the
ports, URLs and when it started, so `status` and `down` act on exactly what `up` started. Written
atomically (temp file + rename). Removed by `down`; MLflow's data lives elsewhere in the home.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmplatform.errors import StackError
from llmplatform.stack.processes import ProcessRecord

STATE_VERSION = 1


@dataclass
class ComponentState:
    """One running component as `up` recorded it."""

    name: str  # "ray" | "mlflow"
    process: ProcessRecord
    url: str  # health/UI URL: the Ray dashboard, the MLflow server
    ports: dict[str, int]
    started: str  # ISO-8601 UTC
    extra: dict = field(default_factory=dict)  # e.g. ray: address, temp_dir, client_env

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "process": self.process.to_dict(),
            "url": self.url,
            "ports": dict(self.ports),
            "started": self.started,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ComponentState":
        return cls(
            name=str(data["name"]),
            process=ProcessRecord.from_dict(data["process"]),
            url=str(data["url"]),
            ports={k: int(v) for k, v in data.get("ports", {}).items()},
            started=str(data.get("started", "")),
            extra=dict(data.get("extra", {})),
        )


def state_path(home: Path) -> Path:
    return Path(home) / "stack.json"


def read_state(home: Path) -> dict[str, ComponentState]:
    """Components recorded in `<home>/stack.json`; empty when there is no file."""
    path = state_path(home)
    try:
        raw = json.loads(path.read_text())
        return {name: ComponentState.from_dict(c) for name, c in raw["components"].items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as exc:
        raise StackError(
            f"{path} is not a valid stack state file ({exc}). If no stack runs from this home, "
            f"delete the file and run `platformctl up` again."
        ) from exc


def write_state(home: Path, components: dict[str, ComponentState]) -> Path:
    """Write the state atomically; with no components, remove the file instead."""
    path = state_path(home)
    if not components:
        remove_state(home)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": STATE_VERSION,
        "home": str(Path(home).resolve()),
        "components": {name: c.to_dict() for name, c in components.items()},
    }
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def remove_state(home: Path) -> None:
    state_path(home).unlink(missing_ok=True)
