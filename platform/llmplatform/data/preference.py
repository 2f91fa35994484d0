"""Preference records (`prompt`, `chosen`, `rejected`) for DPO: read, check, split, tokenize.

Accepted shapes, per JSON object (TRL's preference formats):
- standard: `prompt` a string, `chosen` and `rejected` strings, optional `system` string;
- conversational: `prompt` a list of `{role, content}` messages (optional system first, then
  user/assistant alternating, ending with a user turn); `chosen`/`rejected` a string, one
  assistant message, or a list holding one assistant message;
- implicit prompt: no `prompt`, `chosen` and `rejected` are whole conversations that share
  every message but their last (an assistant answer); the shared part is the prompt.
Every problem in every row is collected and raised together as one `DataError`, each naming the
row (`line N` / `index N`), the field and what would be accepted, like `records`.

Each pair becomes two chat sequences, prompt + chosen and prompt + rejected, tokenized with the
same chat tokenization as SFT (`chat.tokenize_messages`): earlier assistant turns of a
multi-turn prompt carry `"weight": 0` (and `final_answer_only` masks them in any case), so only
the final answer has labels, and the log-prob of an answer is the sum over its labelled tokens. Truncation follows SFT's policy
(`chat.truncate_example` with `data.max_seq_length` and `data.truncation`); a pair is dropped
when either side is dropped.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llmplatform.data.chat import IGNORE_INDEX, TokenizedExample, tokenize_messages, truncate_example
from llmplatform.data.records import ROLES, _short, _type_name
from llmplatform.data.sources import RawRow, dataset_sha256, read_source
from llmplatform.errors import DataError, Problem

SHAPE_ACCEPTED = ("`prompt` (a string or a list of chat messages ending with a user turn), `chosen` and `rejected` "
                  "(strings or one assistant message), optional `system`; or `chosen`/`rejected` as whole "
                  "conversations sharing all but their last (assistant) message")
ANSWER_ACCEPTED = "a non-empty string, {\"role\": \"assistant\", \"content\": ...}, or a list with one such message"
PROMPT_RULE = "an optional system message first, then user/assistant turns alternating, starting and ending with user"


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair: the prompt as chat messages and the two answers' text."""

    prompt: list[dict]  # optional system, then user/assistant alternating, ending with user
    chosen: str
    rejected: str
    location: str  # "line 12" or "index 3"

    def conversation(self, answer: str) -> list[dict]:
        """prompt + answer as chat messages; earlier assistant turns are weight 0 (no loss)."""
        earlier = [{**m, "weight": 0} if m["role"] == "assistant" else dict(m) for m in self.prompt]
        return [*earlier, {"role": "assistant", "content": answer}]


def _messages(raw: Any, where: str, field_name: str, problems: list[Problem]) -> list[dict] | None:
    """A list of {role, content} messages with known roles and string content, or None (problems added)."""
    if not isinstance(raw, list) or not raw:
        problems.append(Problem(where, f"'{field_name}' must be a non-empty list of {{role, content}} messages, got {_type_name(raw)}", _short(raw)))
        return None
    out, ok = [], True
    for i, msg in enumerate(raw):
        at = f"{where}: {field_name}[{i}]"
        if not isinstance(msg, dict):
            problems.append(Problem(at, f"not an object: {_type_name(msg)}", _short(msg), "{\"role\": ..., \"content\": ...}"))
            ok = False
            continue
        if msg.get("role") not in ROLES:
            problems.append(Problem(at, "missing field 'role'" if "role" not in msg else f"unknown role {msg['role']!r}", accepted=", ".join(ROLES)))
            ok = False
        if not isinstance(msg.get("content"), str):
            problems.append(Problem(at, "missing field 'content'" if "content" not in msg else f"non-text content: {_type_name(msg['content'])}",
                                    _short(msg.get("content")) if "content" in msg else None, "a string"))
            ok = False
        out.append({"role": msg.get("role"), "content": msg.get("content")})
    return out if ok else None


def _prompt_order(messages: list[dict], where: str) -> list[Problem]:
    roles = [m["role"] for m in messages]
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            return [Problem(f"{where}: prompt[{i}]", "misordered roles: 'system' may only be the first message", accepted=PROMPT_RULE)]
    offset = 1 if roles and roles[0] == "system" else 0
    turns = roles[offset:]
    if not turns:
        return [Problem(f"{where}: prompt", "no user turn after the system message", accepted=PROMPT_RULE)]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return [Problem(f"{where}: prompt[{i + offset}]", f"misordered roles: '{role}' where '{expected}' was expected", accepted=PROMPT_RULE)]
    if turns[-1] != "user":
        return [Problem(f"{where}: prompt[{len(roles) - 1}]", "the prompt ends with an assistant turn; the answers to compare are `chosen` and `rejected`",
                        accepted=PROMPT_RULE)]
    return []


def _answer(raw: Any, where: str, field_name: str, problems: list[Problem]) -> str | None:
    """`chosen`/`rejected` as text: a string, one assistant message, or a one-message list."""
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if isinstance(raw, dict):
        if raw.get("role") != "assistant" or not isinstance(raw.get("content"), str):
            problems.append(Problem(f"{where}: {field_name}", "must be an assistant message with text content", _short(raw), ANSWER_ACCEPTED))
            return None
        raw = raw["content"]
    if not isinstance(raw, str):
        problems.append(Problem(f"{where}: {field_name}", f"not an answer: {_type_name(raw)}", _short(raw), ANSWER_ACCEPTED))
        return None
    if not raw.strip():
        problems.append(Problem(f"{where}: {field_name}", f"empty answer: '{field_name}' is empty", accepted=ANSWER_ACCEPTED))
        return None
    return raw


def _implicit_prompt(value: dict, where: str, problems: list[Problem]) -> tuple[list[dict], Any, Any] | None:
    """(shared prompt, chosen's last message, rejected's last message) of two whole conversations."""
    chosen = _messages(value["chosen"], where, "chosen", problems)
    rejected = _messages(value["rejected"], where, "rejected", problems)
    if chosen is None or rejected is None:
        return None
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        problems.append(Problem(f"{where}: chosen", "without a 'prompt', 'chosen' and 'rejected' must be conversations that share every message but their last",
                                accepted="a 'prompt' field, or conversations with the same prompt messages"))
        return None
    return chosen[:-1], chosen[-1], rejected[-1]


def normalize_preference(value: Any, location: str) -> tuple[PreferenceRecord | None, list[Problem]]:
    """One row value -> (PreferenceRecord, []) or (None, every problem in it)."""
    if not isinstance(value, dict):
        return None, [Problem(location, f"not an object: {_type_name(value)}", _short(value), "a JSON object per record")]
    problems: list[Problem] = []
    missing = [f for f in ("chosen", "rejected") if f not in value]
    if missing:
        fields = ", ".join(sorted(map(str, value))) or "none"
        return None, [Problem(location, f"missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(f) for f in missing)} (fields: {fields})", accepted=SHAPE_ACCEPTED)]
    system = value.get("system")
    if system is not None and not isinstance(system, str):
        problems.append(Problem(f"{location}: system", f"non-text content: {_type_name(system)}", _short(system), "a string"))
    raw_chosen, raw_rejected = value["chosen"], value["rejected"]
    if "prompt" not in value and isinstance(raw_chosen, list) and len(raw_chosen) > 1:
        implicit = _implicit_prompt(value, location, problems)
        prompt, raw_chosen, raw_rejected = implicit if implicit else (None, None, None)
    elif "prompt" not in value:
        return None, [Problem(location, "missing field 'prompt'", accepted=SHAPE_ACCEPTED)]
    elif isinstance(value["prompt"], str):
        prompt = [{"role": "user", "content": value["prompt"]}]
        if not value["prompt"].strip():
            problems.append(Problem(f"{location}: prompt", "empty prompt", accepted="a non-empty string"))
    else:
        prompt = _messages(value["prompt"], location, "prompt", problems)
    if prompt is not None:
        problems.extend(_prompt_order(prompt, location))
    chosen = _answer(raw_chosen, location, "chosen", problems) if raw_chosen is not None or prompt is not None else None
    rejected = _answer(raw_rejected, location, "rejected", problems) if raw_rejected is not None or prompt is not None else None
    if problems:
        return None, problems
    if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return PreferenceRecord(prompt, chosen, rejected, location), []


def parse_preference_rows(rows: Sequence[RawRow]) -> tuple[list[PreferenceRecord], list[Problem]]:
    """All rows -> (good records, every problem of every bad row)."""
    records, problems = [], []
    for row in rows:
        if row.error is not None:
            problems.append(Problem(row.location, row.error))
            continue
        record, found = normalize_preference(row.value, row.location)
        problems.extend(found)
        if record is not None:
            records.append(record)
    return records, problems


def load_preference_records(uri: str | Path, data: bytes | None = None) -> list[PreferenceRecord]:
    """Read and check a preference file or `hf://datasets/...` split; raise DataError listing every bad record."""
    rows, _ = read_source(uri, data)
    records, problems = parse_preference_rows(rows)
    if problems:
        raise DataError(str(uri), problems)
    if not records:
        raise DataError(str(uri), [Problem("(file)", "no records", accepted="at least one preference record")])
    return records


def split_preference_records(spec_data, split: str = "train", seed: int = 42) -> list[PreferenceRecord]:
    """The records of `split` ("train" or "validation"), held out as SFT does (`dataset.split_holdout`)."""
    from llmplatform.data.dataset import split_holdout

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if split == "validation" and spec_data.validation:
        return load_preference_records(spec_data.validation)
    records = load_preference_records(spec_data.train)
    if spec_data.validation:
        return records
    train, held = split_holdout(records, spec_data.validation_split, seed)
    return train if split == "train" else held


@dataclass
class TokenizedPair:
    """prompt + chosen and prompt + rejected as token ids with labels on the answer only."""

    chosen: dict  # {"input_ids": [...], "labels": [...]}
    rejected: dict
    location: str = ""
    full_length: int = 0  # the longer side before truncation
    truncated: bool = False


def final_answer_only(example: TokenizedExample) -> TokenizedExample:
    """Labels on the trailing labelled span only (the final answer and its EOS): earlier assistant
    turns are masked here too, whether or not the chat tokenization honours `weight: 0`. Applied
    before truncation, so a pair whose final answer is cut off entirely is dropped, never scored
    on an earlier turn."""
    labels = list(example.labels)
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:  # trailing masked tokens (a template's closing text)
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels[:start] = [IGNORE_INDEX] * start
    return TokenizedExample(example.input_ids, labels, example.location, example.full_length, example.truncated, dict(example.extra))


def tokenize_pair(record: PreferenceRecord, tokenizer, max_len: int, truncation: str = "right",
                  system_prompt: str | None = None) -> TokenizedPair | None:
    """Both sides through the SFT tokenization and truncation policy; None if either is dropped."""
    sides = []
    for answer in (record.chosen, record.rejected):
        full = final_answer_only(tokenize_messages(record.conversation(answer), tokenizer, system_prompt, record.location))
        kept = truncate_example(full, max_len, truncation)
        if kept is None:
            return None
        sides.append((full, kept))
    (cf, ck), (rf, rk) = sides
    return TokenizedPair(ck.to_dict(), rk.to_dict(), record.location, max(len(cf), len(rf)), ck.truncated or rk.truncated)


def tokenize_pairs(records: Sequence[PreferenceRecord], tokenizer, max_len: int, truncation: str = "right",
                   system_prompt: str | None = None) -> list[TokenizedPair]:
    """Tokenized pairs, leaving out those the truncation policy drops."""
    out = (tokenize_pair(r, tokenizer, max_len, truncation, system_prompt) for r in records)
    return [p for p in out if p is not None]


def load_and_tokenize_pairs(spec_data, tokenizer, split: str = "train", seed: int = 42) -> list[TokenizedPair]:
    """Tokenized pairs of `split` for a `DataSpec` (max_seq_length, truncation, system_prompt)."""
    records = split_preference_records(spec_data, split, seed)
    return tokenize_pairs(records, tokenizer, spec_data.max_seq_length, spec_data.truncation, spec_data.system_prompt)


@dataclass
class PreferenceReport:
    """What validation found in a preference file (and the spec's validation file)."""

    source: str
    sha256: str
    records: int
    shapes: dict[str, int]
    max_len: int
    truncation: str
    pairs: int  # kept after the truncation policy
    tokens_p50: int  # the longer side of each pair, before truncation
    tokens_max: int
    truncated: int
    dropped: int
    split: str = "train"
    validation: "PreferenceReport | None" = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """Human-readable summary (what `platformctl data validate` prints for a DPO spec)."""
        lines = [f"{self.source} ({self.split}): {self.records} preference record(s), {self.pairs} pair(s) kept",
                 f"  tokens per pair (longer side, before truncation): p50 {self.tokens_p50}, max {self.tokens_max}; "
                 f"max_seq_length {self.max_len}, truncation {self.truncation}: {self.truncated} truncated, {self.dropped} dropped",
                 f"  sha256 {self.sha256}", *(f"  note: {n}" for n in self.notes)]
        if self.validation is not None:
            lines += ["", self.validation.render()]
        return "\n".join(lines)


def preference_report(path: str | Path, tokenizer, max_len: int, truncation: str = "right", system_prompt: str | None = None,
                      split: str = "train") -> PreferenceReport:
    """Check every record of a preference file (DataError lists the bad ones) and count tokens."""
    records = load_preference_records(path)
    lengths, truncated, kept = [], 0, 0
    for record in records:
        pair = tokenize_pair(record, tokenizer, max_len, truncation, system_prompt)
        if pair is None:
            continue
        kept += 1
        truncated += pair.truncated
        lengths.append(pair.full_length)
    notes = [] if kept else [f"every pair is longer than data.max_seq_length {max_len} and was dropped"]
    return PreferenceReport(str(path), dataset_sha256(path), len(records), {"preference": len(records)}, max_len, truncation, kept,
                            int(statistics.median(lengths)) if lengths else 0, max(lengths, default=0), truncated, len(records) - kept, split, notes=notes)


def validate_preference_dataset(spec, tokenizer) -> PreferenceReport:
    """The train (and validation) files of a DPO FineTuneSpec; every bad record of both raised together."""
    d = spec.data
    files = [("train", d.train)] + ([("validation", d.validation)] if d.validation else [])
    problems: list[Problem] = []
    reports = {}
    for split, path in files:
        try:
            reports[split] = preference_report(path, tokenizer, d.max_seq_length, d.truncation, d.system_prompt, split)
        except DataError as exc:  # with two files, each location names its file, as `validate_dataset` does
            problems += [Problem(f"{path}: {p.location}", p.message, p.given, p.accepted) if len(files) > 1 else p for p in exc.problems]
    if problems:
        raise DataError(" + ".join(str(p) for _, p in files), problems)
    report = reports["train"]
    report.validation = reports.get("validation")
    return report
