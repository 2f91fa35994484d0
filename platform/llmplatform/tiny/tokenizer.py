"""The `llama2-tiny` tokenizer: a SentencePiece BPE model trained locally, Llama 2 style.

Llama 2's tokenizer is SentencePiece BPE with byte fallback, digits split one per token,
`<unk>`=0, `<s>`=1, `</s>`=2 and no pad token. We train the same kind of model, with a vocab
of 1024, on text generated here in a fixed order (templated sentences, number words, sums,
spelled words, the chat-format markers and some standard-library docstrings), so the same
code gives the same `tokenizer.model` bytes on every run. `write_tokenizer(dir)` writes the
files `AutoTokenizer.from_pretrained(dir)` needs, including Meta's Llama 2 chat template.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
from pathlib import Path

from llmplatform.chat_template import LLAMA2_CHAT_TEMPLATE
from llmplatform.tiny import text

VOCAB_SIZE = 1024

CHAT_TEMPLATE = LLAMA2_CHAT_TEMPLATE  # part of the cache key: a change rebuilds the tokenizer

# Standard-library modules whose docstrings add ordinary English and code words to the corpus.
# Fixed order; a different Python changes the corpus and therefore the cache key.
_DOC_MODULES = (
    "argparse", "collections", "csv", "datetime", "functools", "itertools", "json", "logging",
    "pathlib", "random", "re", "shutil", "string", "subprocess", "textwrap", "unittest",
)

_TRAINER_ARGS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    byte_fallback=True,
    split_digits=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    max_sentence_length=4192,
    num_threads=1,
    shuffle_input_sentence=False,
    input_sentence_size=0,
    minloglevel=2,
)


def _docstrings() -> list[str]:
    # Only names a module declares (`__all__`), never whatever `vars()` holds at the moment:
    # lazy attributes (e.g. unittest's) appear once some other import touched them, and the
    # corpus, hence the tokenizer, would depend on what the process imported before.
    out = []
    for name in _DOC_MODULES:
        mod = importlib.import_module(name)
        out.append(inspect.getdoc(mod) or "")
        public = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for attr in sorted(public):
            obj = getattr(mod, attr, None)
            if callable(obj):
                out.append(inspect.getdoc(obj) or "")
    return [line for doc in out for line in doc.splitlines() if line.strip()]


def corpus_lines() -> list[str]:
    """The tokenizer's training text, one sentence a line, in a fixed order."""
    chat = [
        "[INST] <<SYS>>", "<</SYS>>", "[/INST]", "[INST] What is 12 + 30? [/INST] 42",
        "<<SYS>>\nYou are a helpful assistant.\n<</SYS>>",
    ] * 50
    return text.tokenizer_corpus() + chat + _docstrings()


def train_model_bytes(lines: list[str] | None = None) -> bytes:
    """Train the SentencePiece model on `lines` (default: `corpus_lines()`); return its bytes."""
    import sentencepiece as spm

    lines = corpus_lines() if lines is None else lines
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **_TRAINER_ARGS)
    return buf.getvalue()


def recipe_key() -> str:
    """A digest of everything the tokenizer depends on: corpus and trainer settings."""
    h = hashlib.sha256(json.dumps(_TRAINER_ARGS, sort_keys=True).encode())
    h.update(CHAT_TEMPLATE.encode())
    for line in corpus_lines():
        h.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def tokenizer_config(model_max_length: int) -> dict:
    """`tokenizer_config.json`: Llama 2's settings (BOS added, no EOS, legacy spacing)."""
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "sp_model_kwargs": {},
    }


def write_tokenizer(out_dir: Path, model_max_length: int, model_bytes: bytes | None = None) -> Path:
    """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json, chat_template.jinja."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model_bytes or train_model_bytes())
    cfg = tokenizer_config(model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out_dir
