"""Datasets for fine-tuning: read, check, render with the base's chat template, mask, pack, batch.

The public surface other packages use; see each module for the policies (truncation in
`chat`, packing and masks in `packing`, resumable order in `dataset`, reports in `validate`).
"""

from llmplatform.data.chat import (
    IGNORE_INDEX,
    TokenizedExample,
    render_chat,
    render_prompt,
    tokenize_messages,
    tokenize_record,
    tokenize_text,
    truncate_example,
)
from llmplatform.data.dataset import TokenizedDataset, load_and_tokenize, split_holdout, split_records, tokenize_records
from llmplatform.data.packing import block_causal_mask, collate, pack_examples
from llmplatform.data.records import FORMATS, ROLES, Record, load_records
from llmplatform.data.sources import dataset_sha256
from llmplatform.data.validate import DataReport, load_tokenizer, preview_example, validate_dataset

__all__ = [
    "IGNORE_INDEX", "FORMATS", "ROLES", "DataReport", "Record", "TokenizedDataset", "TokenizedExample",
    "block_causal_mask", "collate", "dataset_sha256", "load_and_tokenize", "load_records",
    "load_tokenizer", "pack_examples", "preview_example", "render_chat", "render_prompt", "split_holdout", "split_records",
    "tokenize_messages", "tokenize_record", "tokenize_text", "tokenize_records", "truncate_example", "validate_dataset",
]
