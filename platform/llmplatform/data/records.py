"""Record shapes: chat, prompt/completion and Alpaca, normalised to a list of chat messages.

`load_records(uri, fmt)` reads a file (see `sources`) and turns each row into a `Record` whose
`messages` are `{"role", "content"}` dicts: an optional system message first, then strictly
alternating user/assistant turns that start with a user turn and end with an assistant answer.
Every problem in every row is collected (invalid JSON, not an object, missing fields, unknown
or misordered roles, empty assistant turns, non-text content) and raised together as one
`DataError`, each problem carrying the row's location (`line N` or `index N`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmplatform.data.sources import RawRow, read_bytes, read_rows
from llmplatform.errors import DataError, Problem

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "chat", "prompt_completion", "alpaca")
SHAPES_ACCEPTED = "`messages` (chat), `prompt` + `completion`, or `instruction` + `output` (+ optional `input`, Alpaca)"


@dataclass(frozen=True)
class Record:
    """One training example as chat messages, with where it came from and its original shape."""

    messages: list[dict[str, str]]
    location: str  # "line 12" (JSON lines, 1-based) or "index 3" (JSON array / Parquet, 0-based)
    shape: str  # chat | prompt_completion | alpaca


def detect_shape(value: dict) -> str | None:
    """The shape a JSON object looks like, from its field names; None if none fits."""
    if "messages" in value:
        return "chat"
    if "prompt" in value or "completion" in value:
        return "prompt_completion"
    if "instruction" in value or "output" in value:
        return "alpaca"
    return None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null", str: "a string"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text_field(value: dict, field: str, where: str, problems: list[Problem], required: bool = True) -> str | None:
    """`value[field]` if it is a string; otherwise record why not (missing or non-text)."""
    if field not in value or (value[field] is None and not required):
        if required:
            problems.append(Problem(where, f"missing field '{field}'", accepted=SHAPES_ACCEPTED))
        return None
    content = value[field]
    if not isinstance(content, str):
        problems.append(Problem(where, f"non-text content in '{field}': {_type_name(content)}", _short(content), "a string"))
        return None
    return content


def _chat_messages(value: dict, where: str, problems: list[Problem]) -> list[dict[str, str]]:
    raw = value.get("messages")
    if not isinstance(raw, list):
        problems.append(Problem(where, f"'messages' must be a list of {{role, content}} objects, got {_type_name(raw)}", _short(raw)))
        return []
    if not raw:
        problems.append(Problem(where, "missing fields: 'messages' is empty", accepted="at least a user and an assistant message"))
        return []
    messages, roles_known = [], True
    for i, msg in enumerate(raw):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            problems.append(Problem(at, f"not an object: {_type_name(msg)}", _short(msg), "{\"role\": ..., \"content\": ...}"))
            roles_known = False
            continue
        role = msg.get("role")
        if "role" not in msg:
            problems.append(Problem(at, "missing field 'role'", accepted="system, user or assistant"))
            roles_known = False
        elif role not in ROLES:
            problems.append(Problem(at, f"unknown role {role!r}", accepted=", ".join(ROLES)))
            roles_known = False
        content = _text_field(msg, "content", at, problems)
        if role == "assistant" and isinstance(content, str) and not content.strip():
            problems.append(Problem(at, "empty assistant turn", accepted="a non-empty answer"))
        messages.append({"role": role, "content": content})
    if roles_known:
        problems.extend(_order_problems([m["role"] for m in messages], where))
    return messages


def _order_problems(roles: list[str], where: str) -> list[Problem]:
    """System only first; then user, assistant, user, ... ending with assistant (first fault only)."""
    rule = "an optional system message first, then user/assistant turns alternating, starting with user, ending with assistant"
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            return [Problem(f"{where}: messages[{i}]", "misordered roles: 'system' may only be the first message", accepted=rule)]
    turns = roles[1:] if roles and roles[0] == "system" else roles
    offset = len(roles) - len(turns)
    if not turns:
        return [Problem(where, "missing fields: no user/assistant turns after the system message", accepted=rule)]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return [Problem(f"{where}: messages[{i + offset}]", f"misordered roles: '{role}' where '{expected}' was expected", accepted=rule)]
    if turns[-1] != "assistant":
        return [Problem(f"{where}: messages[{len(roles) - 1}]", "misordered roles: the conversation ends with a user turn, not an assistant answer", accepted=rule)]
    return []


def normalize(value: Any, location: str, fmt: str = "auto") -> tuple[Record | None, list[Problem]]:
    """One row value -> (Record, []) or (None, problems)."""
    problems: list[Problem] = []
    if not isinstance(value, dict):
        return None, [Problem(location, f"not an object: {_type_name(value)}", _short(value), "a JSON object per record")]
    shape = detect_shape(value) if fmt == "auto" else fmt
    if shape is None:
        fields = ", ".join(sorted(map(str, value))) or "none"
        return None, [Problem(location, f"missing fields: no known record shape (fields: {fields})", accepted=SHAPES_ACCEPTED)]
    system = _text_field(value, "system", location, problems, required=False) if shape != "chat" else None
    if shape == "chat":
        messages = _chat_messages(value, location, problems) if "messages" in value else []
        if "messages" not in value:
            problems.append(Problem(location, "missing field 'messages' (format chat)", accepted=SHAPES_ACCEPTED))
    elif shape == "prompt_completion":
        prompt = _text_field(value, "prompt", location, problems)
        answer = _text_field(value, "completion", location, problems)
        if isinstance(answer, str) and not answer.strip():
            problems.append(Problem(location, "empty assistant turn: 'completion' is empty", accepted="a non-empty completion"))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    elif shape == "alpaca":
        instruction = _text_field(value, "instruction", location, problems)
        extra = _text_field(value, "input", location, problems, required=False)
        answer = _text_field(value, "output", location, problems)
        if isinstance(answer, str) and not answer.strip():
            problems.append(Problem(location, "empty assistant turn: 'output' is empty", accepted="a non-empty output"))
        user = f"{instruction}\n\n{extra.strip()}" if instruction is not None and extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    else:
        raise ValueError(f"unknown record format {fmt!r}; expected one of {FORMATS}")
    if problems:
        return None, problems
    if system is not None and system.strip():
        messages = [{"role": "system", "content": system}, *messages]
    return Record(messages, location, shape), []


def parse_rows(rows: list[RawRow], fmt: str = "auto") -> tuple[list[Record], list[Problem]]:
    """All rows -> (good records, every problem of every bad row)."""
    if fmt not in FORMATS:
        raise DataError("format", [Problem("format", "unknown record format", fmt, ", ".join(FORMATS))])
    records, problems = [], []
    for row in rows:
        if row.error is not None:
            problems.append(Problem(row.location, row.error))
            continue
        record, found = normalize(row.value, row.location, fmt)
        problems.extend(found)
        if record is not None:
            records.append(record)
    return records, problems


def load_records(uri: str | Path, fmt: str = "auto", data: bytes | None = None) -> list[Record]:
    """Read and check a dataset file; raise DataError listing every bad record."""
    data = read_bytes(uri) if data is None else data
    records, problems = parse_rows(read_rows(uri, data), fmt)
    if problems:
        raise DataError(str(uri), problems)
    if not records:
        raise DataError(str(uri), [Problem("(file)", "no records", accepted="at least one record")])
    return records
