"""Record shapes: chat, ShareGPT, prompt/completion, Alpaca and plain text, normalised to a `Record`.

`load_records(uri, fmt)` reads a file or a Hugging Face dataset (see `sources`) and turns each
row into a `Record`. Conversation shapes become `messages`, `{"role", "content"}` dicts: an
optional system message first, then strictly alternating user/assistant turns that start with a
user turn and end with an assistant answer.

- chat: `{"messages": [{"role", "content", "weight"?}, ...]}` (OpenAI's format). `weight` (0 or
  1, assistant messages only) is kept in the message dict as an int; 0 means no loss on that
  turn. A conversation whose every assistant turn has weight 0 has nothing to train: an error.
- sharegpt: `{"conversations": [{"from", "value"}, ...], "system"?}`; `from` is human/user,
  gpt/assistant or system. Turns may carry `weight` like chat messages.
- prompt_completion: `{"prompt", "completion", "system"?}`; alpaca: `{"instruction", "input"?,
  "output", "system"?}`.
- text: `{"text": ...}` for continued pretraining: `Record(shape="text", messages=[], text=...)`.

A file holds either conversations or text records, not both: mixing pretraining text with chat
in one file is almost always a mistake, so with `auto` each record of the minority kind is
reported, naming the file's dominant shape. Preference records (`prompt`/`chosen`/`rejected`)
are detected as shape `preference` and refused here: they train with `objective: dpo`.

Every problem in every row is collected (invalid JSON, not an object, missing fields, unknown
or misordered roles, empty assistant turns, non-text content, bad weights) and raised together
as one `DataError`, each problem carrying the row's location (`line N` or `index N`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmplatform.data.sources import RawRow, read_source
from llmplatform.errors import DataError, Problem

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CONVERSATION_SHAPES = ("chat", "sharegpt", "prompt_completion", "alpaca")
SHAPES_ACCEPTED = ("`messages` (chat), `conversations` (ShareGPT), `prompt` + `completion`, "
                   "`instruction` + `output` (+ optional `input`, Alpaca), or `text` (continued pretraining)")


@dataclass(frozen=True)
class Record:
    """One training example, with where it came from and its original shape.

    Conversation shapes fill `messages`; a `text` record has `messages == []` and `text` set.
    """

    messages: list[dict[str, Any]]
    location: str  # "line 12" (JSON lines, 1-based) or "index 3" (JSON array / Parquet / HF dataset, 0-based)
    shape: str  # chat | sharegpt | prompt_completion | alpaca | text
    text: str | None = None


def detect_shape(value: dict) -> str | None:
    """The shape a JSON object looks like, from its field names; None if none fits.

    `preference` (chosen/rejected) is detected so it is never mistaken for prompt/completion;
    `text` comes last because instruction datasets often carry a rendered `text` column too.
    """
    if "messages" in value:
        return "chat"
    if "conversations" in value:
        return "sharegpt"
    if "chosen" in value or "rejected" in value:
        return "preference"
    if "prompt" in value or "completion" in value:
        return "prompt_completion"
    if "instruction" in value or "output" in value:
        return "alpaca"
    if "text" in value:
        return "text"
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


def _weight(msg: dict, role: str | None, at: str, problems: list[Problem]) -> int | None:
    """OpenAI's per-message `weight`: 0 or 1 on assistant turns only; None when absent (or null)."""
    weight = msg.get("weight")
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        problems.append(Problem(at, "weight must be 0 (no loss on this turn) or 1 (trained)", _short(weight), "0 or 1"))
        return None
    if role != "assistant":
        problems.append(Problem(at, f"weight on a {role or 'non-assistant'} message: only assistant turns are trained, so only they take a weight",
                                _short(weight), "remove `weight` from system and user messages"))
        return None
    return int(weight)


def _messages(value: dict, where: str, problems: list[Problem], shape: str) -> list[dict[str, Any]]:
    """The chat `messages` or ShareGPT `conversations` list as role/content(/weight) dicts."""
    if shape == "chat":
        field, role_key, content_key, example = "messages", "role", "content", '{"role": ..., "content": ...}'
        role_names = {r: r for r in ROLES}
        accepted_roles = ", ".join(ROLES)
    else:
        field, role_key, content_key, example = "conversations", "from", "value", '{"from": ..., "value": ...}'
        role_names = SHAREGPT_ROLES
        accepted_roles = ", ".join(SHAREGPT_ROLES)
    raw = value.get(field)
    if not isinstance(raw, list):
        problems.append(Problem(where, f"'{field}' must be a list of {example} objects, got {_type_name(raw)}", _short(raw)))
        return []
    if not raw:
        problems.append(Problem(where, f"missing fields: '{field}' is empty", accepted="at least a user and an assistant message"))
        return []
    messages, roles_known = [], True
    for i, msg in enumerate(raw):
        at = f"{where}: {field}[{i}]"
        if not isinstance(msg, dict):
            problems.append(Problem(at, f"not an object: {_type_name(msg)}", _short(msg), example))
            roles_known = False
            continue
        given = msg.get(role_key)
        role = role_names.get(given) if isinstance(given, str) else None
        if given is None:
            problems.append(Problem(at, f"missing field '{role_key}'", accepted=accepted_roles))
            roles_known = False
        elif role is None:
            problems.append(Problem(at, f"unknown role {given!r}" if shape == "chat" else f"unknown 'from' value {given!r}", accepted=accepted_roles))
            roles_known = False
        content = _text_field(msg, content_key, at, problems)
        if role == "assistant" and isinstance(content, str) and not content.strip():
            problems.append(Problem(at, "empty assistant turn", accepted="a non-empty answer"))
        weight = _weight(msg, role, at, problems)
        message: dict[str, Any] = {"role": role if role else given, "content": content}
        if weight is not None:
            message["weight"] = weight
        messages.append(message)
    if roles_known:
        problems.extend(_order_problems([m["role"] for m in messages], where, field))
    return messages


def _order_problems(roles: list[str], where: str, field: str = "messages") -> list[Problem]:
    """System only first; then user, assistant, user, ... ending with assistant (first fault only)."""
    rule = "an optional system message first, then user/assistant turns alternating, starting with user, ending with assistant"
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            return [Problem(f"{where}: {field}[{i}]", "misordered roles: 'system' may only be the first message", accepted=rule)]
    turns = roles[1:] if roles and roles[0] == "system" else roles
    offset = len(roles) - len(turns)
    if not turns:
        return [Problem(where, "missing fields: no user/assistant turns after the system message", accepted=rule)]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return [Problem(f"{where}: {field}[{i + offset}]", f"misordered roles: '{role}' where '{expected}' was expected", accepted=rule)]
    if turns[-1] != "assistant":
        return [Problem(f"{where}: {field}[{len(roles) - 1}]", "misordered roles: the conversation ends with a user turn, not an assistant answer", accepted=rule)]
    return []


def _nothing_to_train(messages: list[dict[str, Any]], where: str) -> list[Problem]:
    answers = [m for m in messages if m["role"] == "assistant"]
    if answers and all(m.get("weight", 1) == 0 for m in answers):
        return [Problem(where, "nothing to train: every assistant turn has weight 0", accepted="weight 1 (or no weight) on at least one assistant turn")]
    return []


def _pair(value: dict, shape: str, where: str, problems: list[Problem]) -> list[dict[str, Any]]:
    """The user/assistant pair of a prompt_completion or alpaca record."""
    if shape == "prompt_completion":
        user = _text_field(value, "prompt", where, problems)
        answer_field = "completion"
    else:
        instruction = _text_field(value, "instruction", where, problems)
        extra = _text_field(value, "input", where, problems, required=False)
        user = f"{instruction}\n\n{extra.strip()}" if instruction is not None and extra and extra.strip() else instruction
        answer_field = "output"
    answer = _text_field(value, answer_field, where, problems)
    if isinstance(answer, str) and not answer.strip():
        problems.append(Problem(where, f"empty assistant turn: '{answer_field}' is empty", accepted=f"a non-empty {answer_field}"))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def normalize(value: Any, location: str, fmt: str = "auto") -> tuple[Record | None, list[Problem]]:
    """One row value -> (Record, []) or (None, problems)."""
    problems: list[Problem] = []
    if not isinstance(value, dict):
        return None, [Problem(location, f"not an object: {_type_name(value)}", _short(value), "a JSON object per record")]
    shape = detect_shape(value) if fmt == "auto" else fmt
    if shape is None:
        fields = ", ".join(sorted(map(str, value))) or "none"
        return None, [Problem(location, f"missing fields: no known record shape (fields: {fields})", accepted=SHAPES_ACCEPTED)]
    if shape == "preference":
        return None, [Problem(location, "a preference record (prompt/chosen/rejected) cannot train supervised fine-tuning",
                              accepted="objective: dpo for preference data, or SFT records: " + SHAPES_ACCEPTED)]
    if shape == "text":
        text = _text_field(value, "text", location, problems)
        if isinstance(text, str) and not text.strip():
            problems.append(Problem(location, "empty text: nothing to train", accepted="a non-empty 'text'"))
        return (None, problems) if problems else (Record([], location, "text", text=text), [])
    if shape not in CONVERSATION_SHAPES:
        raise ValueError(f"unknown record format {fmt!r}; expected one of {FORMATS}")
    system = _text_field(value, "system", location, problems, required=False) if shape != "chat" else None
    if shape in ("chat", "sharegpt"):
        field = "messages" if shape == "chat" else "conversations"
        if field in value:
            messages = _messages(value, location, problems, shape)
        else:
            messages = []
            problems.append(Problem(location, f"missing field '{field}' (format {shape})", accepted=SHAPES_ACCEPTED))
        if not problems:
            problems.extend(_nothing_to_train(messages, location))
    else:
        messages = _pair(value, shape, location, problems)
    if system is not None and system.strip():
        if messages and messages[0]["role"] == "system":
            problems.append(Problem(location, "two system prompts: a top-level 'system' and a system turn in 'conversations'",
                                    accepted="one of them"))
        messages = [{"role": "system", "content": system}, *messages]
    if problems:
        return None, problems
    return Record(messages, location, shape), []


def _mixing_problems(records: list[Record]) -> list[Problem]:
    """A problem per record of the minority kind when text and conversation records share a file.

    The dominant kind is the one with more records (on a tie, the first record's kind).
    """
    texts = [r for r in records if r.shape == "text"]
    chats = [r for r in records if r.shape != "text"]
    if not texts or not chats:
        return []
    first_is_text = records[0].shape == "text"
    text_dominant = len(texts) > len(chats) or (len(texts) == len(chats) and first_is_text)
    minority = chats if text_dominant else texts
    dominant_shape = "text" if text_dominant else max({r.shape for r in chats}, key=lambda s: sum(r.shape == s for r in chats))
    kind = "text records (continued pretraining)" if text_dominant else "conversations"
    return [Problem(r.location, f"a {r.shape} record in a file of {kind} (mostly {dominant_shape}): text and conversation records can't share a file",
                    accepted="one kind per file: text records for continued pretraining, or conversation records for fine-tuning")
            for r in minority]


def parse_rows(rows: list[RawRow], fmt: str = "auto") -> tuple[list[Record], list[Problem]]:
    """All rows -> (good records, every problem of every bad row), in row order."""
    if fmt not in FORMATS:
        raise DataError("format", [Problem("format", "unknown record format", fmt, ", ".join(FORMATS))])
    records, problems = [], []
    for row in rows:
        if row.error is not None:
            problems.append((row.number, Problem(row.location, row.error)))
            continue
        record, found = normalize(row.value, row.location, fmt)
        problems.extend((row.number, p) for p in found)
        if record is not None:
            records.append((row.number, record))
    mixed = {p.location: p for p in _mixing_problems([r for _, r in records])}
    if mixed:
        problems.extend((n, mixed[r.location]) for n, r in records if r.location in mixed)
        records = [(n, r) for n, r in records if r.location not in mixed]
    problems.sort(key=lambda item: item[0])  # stable: a row's own problems keep their order
    return [r for _, r in records], [p for _, p in problems]


def load_records(uri: str | Path, fmt: str = "auto", data: bytes | None = None) -> list[Record]:
    """Read and check a dataset file or `hf://datasets/...` name; raise DataError listing every bad record."""
    rows, _ = read_source(uri, data)
    records, problems = parse_rows(rows, fmt)
    if problems:
        raise DataError(str(uri), problems)
    if not records:
        raise DataError(str(uri), [Problem("(file)", "no records", accepted="at least one record")])
    return records
