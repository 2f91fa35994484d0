"""One error hierarchy for the platform.

Every failure a user can cause is a `PlatformError` with a message that names the field, line
or resource and the fix. The CLI maps these to a clean message and a non-zero exit; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlatformError(Exception):
    """Base class for errors a user can act on. `exit_code` is what the CLI returns."""

    exit_code = 1


class NotImplementedYet(PlatformError):
    """A planned command that a later issue fills in. Exit 2, no pretend output."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One problem found in a spec or data file: where, what was given, what is accepted."""

    location: str  # field path like "lora.rank" or "line 12"
    message: str
    given: object = None
    accepted: str = ""

    def render(self) -> str:
        text = f"{self.location}: {self.message}"
        if self.given is not None:
            text += f" (given: {self.given!r})"
        if self.accepted:
            text += f"; accepted: {self.accepted}"
        return text


class SpecError(PlatformError):
    """A spec (YAML/JSON) failed validation. Carries every problem at once."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  - {p.render()}" for p in problems]
        super().__init__("\n".join(lines))


class StackError(PlatformError):
    """The embedded local stack (Ray head, MLflow server) could not be started or reached."""


class PortInUseError(StackError):
    """A port the stack needs is taken by another process."""


class DataError(PlatformError):
    """A dataset has bad records; carries each one's line number and reason."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} bad record(s)"]
        lines += [f"  - {p.render()}" for p in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  ... and {len(problems) - 50} more")
        super().__init__("\n".join(lines))


class RegistryError(PlatformError):
    """A model-registry operation was refused or failed; nothing was changed."""


class JobError(PlatformError):
    """A fine-tuning job could not be submitted, found or controlled."""


class ServeError(PlatformError):
    """A deployment could not be built, found or reached."""
