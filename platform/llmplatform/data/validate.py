"""Dataset validation: every record checked, token statistics, and a marked preview.

`validate_dataset(path_or_spec, tokenizer, max_len)` reads a data file (or a FineTuneSpec's
train and validation files), raises one `DataError` listing every bad record of every file with
its location and reason, and otherwise returns a `DataReport`: record counts per shape,
token-length p50/p95/max before truncation, the share longer than `max_len`, what the
truncation policy cut or dropped, trained vs masked token counts after truncation, the file's
SHA-256, and one rendered example with its trained span marked. `load_tokenizer` finds the
tokenizer for a base model name or directory without downloading anything.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llmplatform.data.chat import IGNORE_INDEX, TokenizedExample, tokenize_record, truncate_example
from llmplatform.data.packing import pack_examples
from llmplatform.data.records import Record, parse_rows
from llmplatform.data.sources import read_source
from llmplatform.errors import DataError, Problem, SpecError

MARK_PLAIN = ("[[", "]]")
MARK_ANSI = ("\x1b[1;32m", "\x1b[0m")


@dataclass
class DataReport:
    """What validation found in one data file (the spec's validation file in `validation`)."""

    source: str
    sha256: str
    records: int
    shapes: dict[str, int]
    max_len: int
    truncation: str
    examples: int  # kept after the truncation policy
    tokens_p50: int
    tokens_p95: int
    tokens_max: int
    over_max_len: int  # examples longer than max_len before truncation
    over_max_len_share: float
    truncated: int  # cut by `right`
    dropped: int  # left out by the policy
    trained_tokens: int
    masked_tokens: int
    preview: str  # one example, trained span between [[ and ]]
    preview_location: str
    split: str = "train"
    packed_sequences: int | None = None  # with packing: sequences of max_len the examples fill
    packing_fill: float | None = None  # with packing: share of those sequences' tokens that are real
    validation: "DataReport | None" = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """A few aligned lines for people."""
        total = self.trained_tokens + self.masked_tokens
        shapes = ", ".join(f"{k} {v}" for k, v in sorted(self.shapes.items()))
        lines = [
            f"{self.split}: {self.source}",
            f"  sha256          {self.sha256}",
            f"  records         {self.records} ({shapes})",
            f"  tokens/example  p50 {self.tokens_p50}  p95 {self.tokens_p95}  max {self.tokens_max}",
            f"  over {self.max_len:<10} {self.over_max_len} ({self.over_max_len_share:.1%}); truncation={self.truncation}: "
            f"{self.truncated} cut, {self.dropped} dropped; {self.examples} examples kept",
            f"  trained tokens  {self.trained_tokens} ({self.trained_tokens / total:.1%})  masked {self.masked_tokens}" if total else "  trained tokens  0",
            *([f"  packing         {self.examples} examples -> {self.packed_sequences} sequences of {self.max_len} ({self.packing_fill:.1%} filled)"]
              if self.packed_sequences else []),
            *[f"  note            {n}" for n in self.notes],
            f"  preview ({self.preview_location}; trained tokens between {MARK_PLAIN[0]} and {MARK_PLAIN[1]}):",
            *[f"    {line}" for line in self.preview.splitlines()],
        ]
        text = "\n".join(lines)
        return text + ("\n" + self.validation.render() if self.validation else "")


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return int(ordered[int(rank) - 1])


def _run_text(tokenizer, ids: list[int], after_bos: bool) -> str:
    """Text of consecutive tokens: special tokens as their text, the rest decoded.

    SentencePiece marks a word start with "▁"; decoding a run alone drops that space, so it
    is put back, except right after BOS where it is only the tokenizer's dummy prefix.
    """
    special = set(tokenizer.all_special_ids)
    out: list[str] = []
    plain: list[int] = []
    for token in [*ids, None]:
        if token is not None and token not in special:
            plain.append(token)
            continue
        if plain:
            tokens = tokenizer.convert_ids_to_tokens(plain)
            text = tokenizer.convert_tokens_to_string(tokens).lstrip(" ")
            out.append((" " if tokens[0].startswith("▁") and not after_bos else "") + text)
            plain = []
        if token is not None:
            out.append(tokenizer.convert_ids_to_tokens(token))
            after_bos = token == tokenizer.bos_token_id
    return "".join(out)


def preview_example(example: TokenizedExample, tokenizer, marks: tuple[str, str] = MARK_PLAIN) -> str:
    """The example's text with special tokens shown and each trained span wrapped in `marks`."""
    pieces: list[tuple[bool, int]] = list(zip((label != IGNORE_INDEX for label in example.labels), example.input_ids))
    parts, prev = [], None
    i = 0
    while i < len(pieces):
        trained = pieces[i][0]
        j = i
        while j < len(pieces) and pieces[j][0] == trained:
            j += 1
        ids = [token for _, token in pieces[i:j]]
        text = _run_text(tokenizer, ids, prev == tokenizer.bos_token_id)
        parts.append(f"{marks[0]}{text}{marks[1]}" if trained else text)
        prev, i = ids[-1], j
    return "".join(parts)


def _file_stats(source: str, records: list[Record], tokenizer, max_len: int, truncation: str,
                system_prompt: str | None, sha256: str, split: str, packing: bool = False) -> DataReport:
    # untruncated (no length limit) so the statistics see each example's real length
    full = [tokenize_record(r, tokenizer, sys.maxsize, "right", system_prompt) for r in records]
    kept = [truncate_example(ex, max_len, truncation) for ex in full]
    lengths = [len(ex) for ex in full]
    shapes: dict[str, int] = {}
    for r in records:
        shapes[r.shape] = shapes.get(r.shape, 0) + 1
    good = [ex for ex in kept if ex is not None]
    trained = sum(ex.trained_tokens for ex in good)
    sample = next((ex for ex in good if not ex.truncated), good[0] if good else full[0])
    over = sum(1 for n in lengths if n > max_len)
    packs = pack_examples(good, max_len) if packing and good else None
    return DataReport(
        source=source, sha256=sha256, records=len(records), shapes=shapes, max_len=max_len,
        truncation=truncation, examples=len(good), tokens_p50=percentile(lengths, 50),
        tokens_p95=percentile(lengths, 95), tokens_max=max(lengths), over_max_len=over,
        over_max_len_share=over / len(lengths), truncated=sum(1 for ex in good if ex.truncated),
        dropped=len(kept) - len(good), trained_tokens=trained,
        masked_tokens=sum(len(ex) for ex in good) - trained,
        preview=preview_example(sample, tokenizer), preview_location=sample.location, split=split,
        packed_sequences=len(packs) if packs else None,
        packing_fill=sum(len(ex) for ex in good) / (len(packs) * max_len) if packs else None,
    )


def _check_file(path: str, fmt: str, label: str | None = None) -> tuple[list[Record], list[Problem], str]:
    try:
        rows, digest = read_source(path)
        records, problems = parse_rows(rows, fmt)
    except DataError as exc:  # unreadable file or dataset: reported with the other files' problems
        records, problems, digest = [], exc.problems, ""
    if label:
        problems = [Problem(f"{label}: {p.location}", p.message, p.given, p.accepted) for p in problems]
    if not records and not problems:
        problems = [Problem(f"{label}: (file)" if label else "(file)", "no records", accepted="at least one record")]
    return records, problems, digest


def validate_dataset(path_or_spec: Any, tokenizer, max_len: int | None = None, fmt: str | None = None,
                     truncation: str | None = None, system_prompt: str | None = None) -> DataReport:
    """Check a data file, a `DataSpec` or a `FineTuneSpec` (train and validation files).

    For a spec, unset arguments come from it (format, max_seq_length, truncation,
    system_prompt) and the validation file's report is in `.validation`. Raises DataError with
    every bad record of every file; returns the report otherwise.
    """
    data_spec = getattr(path_or_spec, "data", path_or_spec)
    is_spec = hasattr(data_spec, "train")
    if is_spec:
        fmt = fmt or data_spec.format
        max_len = max_len or data_spec.max_seq_length
        truncation = truncation or data_spec.truncation
        system_prompt = system_prompt if system_prompt is not None else data_spec.system_prompt
        packing = data_spec.packing
        files = [("train", data_spec.train)] + ([("validation", data_spec.validation)] if data_spec.validation else [])
    else:
        packing = False
        files = [("train", str(path_or_spec))]
    fmt, truncation = fmt or "auto", truncation or "right"
    if max_len is None:
        raise ValueError("max_len is required when validating a file without a spec")
    checked, problems = [], []
    for split, path in files:
        records, found, digest = _check_file(str(path), fmt, label=str(path) if len(files) > 1 else None)
        problems += found
        checked.append((split, str(path), records, digest))
    if problems:
        raise DataError(" + ".join(str(p) for _, p in files), problems)
    reports = [_file_stats(path, records, tokenizer, max_len, truncation, system_prompt, digest, split, packing)
               for split, path, records, digest in checked]
    main = reports[0]
    if len(reports) > 1:
        main.validation = reports[1]
    elif is_spec and data_spec.validation_split > 0:
        main.notes.append(f"no validation file: {data_spec.validation_split:.0%} of these records are held out for evaluation")
    if main.examples == 0:
        raise DataError(main.source, [Problem("(file)", f"every example was dropped by truncation={truncation} at max_len {max_len}",
                                              accepted="a larger max_seq_length, or truncation: right")])
    return main


def load_tokenizer(name_or_dir: str | Path):
    """A tokenizer from a directory, a `llama2-tiny*` name, or an HF id already in the local cache.

    Nothing is downloaded; a catalog Llama 2 name whose tokenizer isn't available locally
    raises SpecError with a message that suggests `--tokenizer DIR`.
    """
    from transformers import AutoTokenizer

    from llmplatform.basemodels import tokenizer_location

    name = str(name_or_dir)
    resolved = tokenizer_location(name)
    if Path(resolved).is_dir():
        return AutoTokenizer.from_pretrained(resolved)
    try:
        return AutoTokenizer.from_pretrained(resolved, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SpecError(name, [Problem("tokenizer", f"the tokenizer of '{resolved}' is not available on this machine (nothing is downloaded here)",
                                       accepted="--tokenizer DIR: a directory with tokenizer.model and tokenizer_config.json")]) from exc
