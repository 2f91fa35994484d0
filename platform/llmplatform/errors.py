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


class _ProblemsError(PlatformError):
    """An error that carries a source and a list of problems; pickles (Ray ships it between processes)."""

    noun = "problem(s)"

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} {self.noun}"]
        lines += [f"  - {p.render()}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        return "\n".join(lines)

    def __reduce__(self):
        return (type(self), (self.source, self.problems))


class SpecError(_ProblemsError):
    """A spec (YAML/JSON) failed validation. Carries every problem at once."""


class StackError(PlatformError):
    """The embedded local stack (Ray head, MLflow server) could not be started or reached."""


class PortInUseError(StackError):
    """A port the stack needs is taken by another process."""


class DataError(_ProblemsError):
    """A dataset has bad records (or can't be read); carries each one's line number and reason."""

    @property
    def noun(self) -> str:  # type: ignore[override]
        file_level = self.problems and all(p.location == "(file)" for p in self.problems)
        return "problem(s) reading the file" if file_level else "bad record(s)"


class RegistryError(PlatformError):
    """A model-registry operation was refused or failed; nothing was changed."""


class JobError(PlatformError):
    """A fine-tuning job could not be submitted, found or controlled."""


class ServeError(PlatformError):
    """A deployment could not be built, found or reached."""


class EvalError(PlatformError):
    """An evaluation job was refused or failed; nothing was tagged."""
