"""Conversations rendered with the base's chat template, the answer-only loss mask, truncation.

The text a conversation trains on is `tokenizer.apply_chat_template(messages)`: the template
the base's tokenizer carries (or Meta's Llama 2 template when it carries none, see
`llmplatform.chat_template`), the same call serving makes, so training, evaluation and serving
see one format. The text is tokenised as serving tokenises it (`add_special_tokens=False`: the
template writes BOS/EOS itself, as text the tokenizer maps to their ids).

The loss mask comes from the rendered template, not from a hand-written format: answer k spans
the characters that rendering the conversation up to and including answer k adds to rendering it
up to the user turn before (with the generation prompt). Tokens that start inside a span are
trained; everything else (system prompt, user turns, the template's markers) gets label -100.
An assistant message with `"weight": 0` (OpenAI's per-message weight) is masked too. A template
whose rendering of a conversation's beginning is not a prefix of the whole (one that rewrites
earlier turns) is refused with a ValueError naming the turn.

`text` records (continued pretraining) are BOS + text + EOS with every token trained.

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

from llmplatform import chat_template
from llmplatform.chat_template import ensure_chat_template

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


def with_system(messages: Sequence[dict], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The messages as `{role, content}` (weights dropped), `system_prompt` first when they have none."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and system_prompt.strip() and (not plain or plain[0]["role"] != "system"):
        plain.insert(0, {"role": "system", "content": system_prompt})
    return plain


def render_chat(messages: Sequence[dict], tokenizer, system_prompt: str | None = None) -> str:
    """The conversation's text in the tokenizer's chat template (what training tokenises)."""
    return ensure_chat_template(tokenizer).apply_chat_template(with_system(messages, system_prompt), tokenize=False)


def render_prompt(messages: Sequence[dict], tokenizer, system_prompt: str | None = None) -> str:
    """The text serving renders for a conversation awaiting the next answer (generation prompt on)."""
    return chat_template.render_prompt(tokenizer, with_system(messages, system_prompt))


def answer_spans(messages: Sequence[dict], tokenizer, system_prompt: str | None = None) -> tuple[str, list[tuple[int, int, int]]]:
    """(rendered text, [(start, end, weight)] character span of each assistant answer)."""
    convo = with_system(messages, system_prompt)
    offset = len(convo) - len(messages)  # 1 when system_prompt was inserted
    text = render_chat(convo, tokenizer)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(convo[: k + offset], tokenizer)
        upto = render_chat(convo[: k + offset + 1], tokenizer)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(f"the tokenizer's chat template renders messages[{k}] differently as the last answer than inside the "
                             "whole conversation, so its answer can't be located for the loss mask; use a template whose output "
                             "for a conversation's beginning is a prefix of its output for the whole")
        spans.append((len(before), len(upto), int(message.get("weight", 1))))
    return text, spans


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # a slow (Python) tokenizer has no offsets
        raise ValueError(f"tokenizer {type(tokenizer).__name__} gives no character offsets; a fast (tokenizers) tokenizer is needed "
                         "to mask the loss from the rendered chat template") from exc
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def tokenize_messages(messages: Sequence[dict], tokenizer, system_prompt: str | None = None, location: str = "") -> TokenizedExample:
    """The full (untruncated) ids and labels of a conversation; labels on weighted answers only.

    Each answer's labels run through the end of its rendered span: for Llama 2, the answer, the
    separator before `</s>` and `</s>` itself (the model learns to stop).
    """
    text, spans = answer_spans(messages, tokenizer, system_prompt)
    ids, offsets = _offsets(tokenizer, text)
    trained = [(start, end) for start, end, weight in spans if weight]
    labels = [tok if any(start <= s < end for start, end in trained) else IGNORE_INDEX for tok, (s, _) in zip(ids, offsets)]
    return TokenizedExample(ids, labels, location, full_length=len(ids))


def tokenize_text(text: str, tokenizer, location: str = "") -> TokenizedExample:
    """A `text` record for continued pretraining: BOS + text + EOS, every token after BOS trained."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    ids = ([bos] if bos is not None else []) + body + ([eos] if eos is not None else [])
    labels = ([IGNORE_INDEX] if bos is not None else []) + ids[1 if bos is not None else 0:]
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
    location = getattr(record, "location", "")
    if getattr(record, "shape", None) == "text":
        return truncate_example(tokenize_text(record.text, tokenizer, location), max_len, truncation)
    messages = getattr(record, "messages", record)
    return truncate_example(tokenize_messages(messages, tokenizer, system_prompt, location), max_len, truncation)
