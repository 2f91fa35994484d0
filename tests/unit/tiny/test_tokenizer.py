"""The llama2-tiny tokenizer behaves like Llama 2's: bytes, digits, special ids, chat format."""

from __future__ import annotations

import pytest
import sentencepiece as spm


def llama2_chat_text(messages):
    """Llama 2's chat format written out by hand (Meta's reference `chat_completion`)."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "user":
            content = msg["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            out += f"<s>[INST] {content.strip()} [/INST]"
        else:
            out += f" {msg['content'].strip()} </s>"
    return out


CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is 12 + 30?"}],
    "answered": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    "system, multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Reverse the letters: c a t"},
        {"role": "assistant", "content": "t a c"},
        {"role": "user", "content": "And d o g?"},
        {"role": "assistant", "content": "g o d"},
        {"role": "user", "content": "Thanks"},
    ],
}


def test_special_token_ids_are_llama2s(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token is None
    assert len(tok) == 1024
    ids = tok("hello world").input_ids
    assert ids[0] == 1 and ids[-1] != 2  # BOS added, EOS not


def test_byte_fallback_round_trips_unseen_unicode(tiny_tokenizer):
    text = "naïve café ☃ 日本語 😀"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.unk_token_id not in ids
    assert "<0xF0>" in tiny_tokenizer.convert_ids_to_tokens(ids)  # the emoji went to bytes
    assert tiny_tokenizer.decode(ids) == text


def test_digits_are_split_one_per_token(tiny_tokenizer):
    pieces = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer("x 1234567890", add_special_tokens=False).input_ids)
    assert [p for p in pieces if p.strip("▁").isdigit()] == list("1234567890")
    multi_digit = [p for p in tiny_tokenizer.get_vocab() if not p.startswith("<0x") and sum(c.isdigit() for c in p) > 1]
    assert multi_digit == []


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_reproduces_llama2_format(tiny_tokenizer, name):
    messages = CONVERSATIONS[name]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == llama2_chat_text(messages)
    assert rendered.count("<<SYS>>") == (1 if messages[0]["role"] == "system" else 0)


def test_chat_ids_match_metas_sentencepiece_encoding(tiny_random, tiny_tokenizer):
    """Meta encodes each turn as [BOS] + sp("[INST] u [/INST] a ") + [EOS]; legacy=True matches it."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_random / "tokenizer.model"))
    messages = CONVERSATIONS["system, multi-turn"]
    sys_user = "<<SYS>>\nYou are terse.\n<</SYS>>\n\nReverse the letters: c a t"
    expected = [1, *sp.encode(f"[INST] {sys_user} [/INST] t a c "), 2,
                1, *sp.encode("[INST] And d o g? [/INST] g o d "), 2,
                1, *sp.encode("[INST] Thanks [/INST]")]
    ids = tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == expected


def test_chat_template_refuses_non_alternating_roles(tiny_tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        tiny_tokenizer.apply_chat_template(bad, tokenize=False)


def test_tokenizer_training_is_deterministic():
    from llmplatform.tiny import tokenizer

    lines = tokenizer.corpus_lines()
    assert tokenizer.train_model_bytes(lines) == tokenizer.train_model_bytes(list(lines))


def test_recipe_key_does_not_depend_on_what_the_process_imported():
    """A fresh interpreter (a CLI, a Ray worker) must find the same cache dir as this pytest process."""
    import subprocess
    import sys

    from llmplatform.tiny import tokenizer

    code = "from llmplatform.tiny import tokenizer; print(tokenizer.recipe_key())"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == tokenizer.recipe_key()
