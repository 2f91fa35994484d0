"""Llama 2 chat format, loss masking and truncation.

Each user/assistant turn renders as `<s>[INST] {user} [/INST] {assistant} </s>`; the system
prompt is folded into the first turn only, as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}` (Meta's
`llama/generation.py`). Contents are stripped of surrounding whitespace, as Meta does.

Token ids are built piece by piece so the loss mask is exact: per turn `[BOS]`, then the
tokens of `[INST] {user} [/INST]` (labels -100), then the tokens of `{assistant}` and `[EOS]`
(labels = the ids). BOS/EOS are the tokenizer's special ids, never the text `<s>`; special-token
text inside user content is tokenised as plain text. The space between `[/INST]` and the answer
is SentencePiece's word-start mark on the answer's first token, so the pieces concatenate to
what tokenising the turn text in one go gives; the space before `</s>` is the template's
separator and is not a token (the model learns answer -> EOS).

Truncation (`max_len` tokens per example):
- `right`: keep the first `max_len` tokens, then drop trailing masked tokens (they carry no
  loss). The prompt is never cut while its answer survives; an answer may be cut mid-way (no
  EOS then). If no trained token remains (the first prompt alone fills `max_len`), the example
  is dropped.
- `drop`: an example longer than `max_len` is dropped whole.
Dropped examples come back as `None`; callers count them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
IGNORE_INDEX = -100
TRUNCATION = ("right", "drop")


@dataclass
class TokenizedExample:
    """One example as token ids with aligned labels (-100 = no loss; the model shifts them)."""

    input_ids: list[int]
    labels: list[int]
    location: str = ""  # where the record came from, e.g. "line 12"
    full_length: int = 0  # tokens before truncation
    truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def to_dict(self) -> dict[str, list[int]]:
        return {"input_ids": list(self.input_ids), "labels": list(self.labels)}


def chat_turns(messages: Sequence[dict], system_prompt: str | None = None) -> list[tuple[str, str]]:
    """(user text with the system block folded into the first, assistant text) per turn.

    `system_prompt` is used only when the messages have no system message of their own.
    """
    messages = list(messages)
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    elif system_prompt and system_prompt.strip():
        system = system_prompt
    turns = []
    for i in range(0, len(messages) - 1, 2):
        user, answer = messages[i], messages[i + 1]
        if user["role"] != "user" or answer["role"] != "assistant":
            raise ValueError(f"roles must alternate user/assistant; got {user['role']}, {answer['role']} at {i}")
        text = user["content"].strip()
        if i == 0 and system is not None:
            text = f"{B_SYS}{system.strip()}{E_SYS}{text}"
        turns.append((text, answer["content"].strip()))
    return turns


def render_chat(messages: Sequence[dict], system_prompt: str | None = None) -> str:
    """The Llama 2 chat text of a conversation, `<s>`/`</s>` written out as text."""
    return "".join(f"{BOS_TEXT}{B_INST} {user} {E_INST} {answer} {EOS_TEXT}" for user, answer in chat_turns(messages, system_prompt))


def _encode(tokenizer, text: str) -> list[int]:
    # split_special_tokens: a literal "</s>" typed by a user is text, not the EOS id
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def special_ids(tokenizer) -> tuple[int, int]:
    """(BOS id, EOS id); a tokenizer without them can't produce Llama 2 sequences."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no BOS/EOS token ids; a Llama 2 SentencePiece tokenizer is needed")
    return bos, eos


def tokenize_messages(messages: Sequence[dict], tokenizer, system_prompt: str | None = None, location: str = "") -> TokenizedExample:
    """The full (untruncated) ids and labels of a conversation; labels on answers + EOS only."""
    bos, eos = special_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for user, answer in chat_turns(messages, system_prompt):
        prompt = [bos] + _encode(tokenizer, f"{B_INST} {user} {E_INST}")
        target = _encode(tokenizer, answer) + [eos]
        ids += prompt + target
        labels += [IGNORE_INDEX] * len(prompt) + target
    return TokenizedExample(ids, labels, location, full_length=len(ids))


def truncate_example(example: TokenizedExample, max_len: int, truncation: str = "right") -> TokenizedExample | None:
    """Apply the truncation policy in the module docstring; None means the example is dropped."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if len(example.input_ids) <= max_len:
        return example
    if truncation == "drop":
        return None
    ids, labels = example.input_ids[:max_len], example.labels[:max_len]
    while labels and labels[-1] == IGNORE_INDEX:  # trailing prompt tokens train nothing
        ids, labels = ids[:-1], labels[:-1]
    if not labels:
        return None
    return TokenizedExample(ids, labels, example.location, example.full_length, True, dict(example.extra))


def tokenize_record(record, tokenizer, max_len: int, truncation: str = "right", system_prompt: str | None = None) -> TokenizedExample | None:
    """A `Record` (or a list of messages) -> truncated TokenizedExample, or None if dropped."""
    messages = getattr(record, "messages", record)
    location = getattr(record, "location", "")
    return truncate_example(tokenize_messages(messages, tokenizer, system_prompt, location), max_len, truncation)
