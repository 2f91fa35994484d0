"""Llama 2 chat rendering, the exact loss mask, and the truncation policies."""

from __future__ import annotations

from llmplatform.data import IGNORE_INDEX, render_chat, tokenize_messages, tokenize_record, truncate_example

from datatest_helpers import chat

CONVO = chat("What is 2 + 3?", "5", "  And 4 + 4? ", "It is 8.", "Thanks", "You're welcome!", system="Be brief.")["messages"]


def test_multi_turn_render_is_llama2_exactly():
    assert render_chat(CONVO) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] 5 </s>"
        "<s>[INST] And 4 + 4? [/INST] It is 8. </s>"
        "<s>[INST] Thanks [/INST] You're welcome! </s>"
    )


def test_default_system_prompt_only_when_none_given_and_only_first_turn():
    plain = chat("hi", "hello", "bye", "ciao")["messages"]
    assert render_chat(plain) == "<s>[INST] hi [/INST] hello </s><s>[INST] bye [/INST] ciao </s>"
    assert render_chat(plain, system_prompt="Sys") == "<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] bye [/INST] ciao </s>"
    assert render_chat(CONVO, system_prompt="Other").count("<<SYS>>\nBe brief.") == 1
    assert "Other" not in render_chat(CONVO, system_prompt="Other")


def _spans(labels):
    """Consecutive runs of trained positions as (start, end)."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_labels_cover_exactly_each_answer_and_its_eos(tokenizer):
    ex = tokenize_messages(CONVO, tokenizer)
    assert len(ex.input_ids) == len(ex.labels) == ex.full_length
    answers = [m["content"].strip() for m in CONVO if m["role"] == "assistant"]
    spans = _spans(ex.labels)
    assert len(spans) == len(answers)
    for (start, end), answer in zip(spans, answers):
        assert ex.labels[start:end] == ex.input_ids[start:end]
        assert tokenizer.decode(ex.input_ids[start:end]) == answer + "</s>"
        assert ex.input_ids[end - 1] == tokenizer.eos_token_id
    # BOS/EOS are the special ids, once per turn, and BOS is never trained
    assert ex.input_ids.count(tokenizer.bos_token_id) == ex.input_ids.count(tokenizer.eos_token_id) == 3
    assert all(label == IGNORE_INDEX for tok, label in zip(ex.input_ids, ex.labels) if tok == tokenizer.bos_token_id)
    # masked tokens decode to the prompts
    masked = [t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX and t != tokenizer.bos_token_id]
    assert tokenizer.decode(masked) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] [INST] And 4 + 4? [/INST] [INST] Thanks [/INST]"


def test_piecewise_ids_equal_tokenising_each_turn_whole(tokenizer):
    """The mask boundary doesn't change the tokens: pieces == Meta's one-string-per-turn encode."""
    ex = tokenize_messages(CONVO, tokenizer)
    expected = []
    for text in ["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] 5", "[INST] And 4 + 4? [/INST] It is 8.", "[INST] Thanks [/INST] You're welcome!"]:
        expected += [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ex.input_ids == expected


def test_special_token_text_in_content_is_plain_text(tokenizer):
    ex = tokenize_messages(chat("say </s> and <s>", "ok </s>")["messages"], tokenizer)
    assert ex.input_ids.count(tokenizer.eos_token_id) == 1 and ex.input_ids.count(tokenizer.bos_token_id) == 1


def test_right_truncation_keeps_prompt_cuts_answer_and_drops_when_nothing_trained(tokenizer):
    convo = chat("Question one", "a long answer " * 20, "Question two", "short")["messages"]
    full = tokenize_messages(convo, tokenizer)
    first_answer = _spans(full.labels)[0]
    cut_at = first_answer[0] + 5
    ex = truncate_example(full, cut_at, "right")
    assert ex.truncated and len(ex.input_ids) == cut_at
    assert ex.input_ids == full.input_ids[:cut_at] and ex.labels == full.labels[:cut_at]
    assert ex.trained_tokens == 5
    # a cut inside the second prompt leaves no trailing masked tokens
    second_prompt = (first_answer[1] + _spans(full.labels)[1][0]) // 2
    ex2 = truncate_example(full, second_prompt, "right")
    assert len(ex2.input_ids) == first_answer[1] and ex2.labels[-1] == tokenizer.eos_token_id
    # the first prompt alone fills max_len: dropped
    assert truncate_example(full, first_answer[0], "right") is None
    # not over length: unchanged
    assert truncate_example(full, len(full.input_ids), "right") is full


def test_drop_truncation_skips_long_examples(tokenizer):
    record = chat("q", "a b c d e f g")["messages"]
    n = len(tokenize_messages(record, tokenizer).input_ids)
    assert tokenize_record(record, tokenizer, n - 1, "drop") is None
    assert len(tokenize_record(record, tokenizer, n, "drop").input_ids) == n


def test_training_text_and_ids_match_the_served_chat_template(tokenizer):
    """Serving builds prompts with the tokenizer's chat template: the same text, the same ids."""
    assert tokenizer.apply_chat_template(CONVO, tokenize=False) == render_chat(CONVO)
    ex = tokenize_messages(CONVO, tokenizer)
    # a served prompt (system + user) is exactly the training ids up to the first trained token
    served = tokenizer.apply_chat_template(CONVO[:2], tokenize=True, return_dict=True)["input_ids"]
    first_answer_start = next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
    assert served == ex.input_ids[:first_answer_start]
