"""Rendering with the tokenizer's chat template, the answer-only mask it gives, truncation policies.

The contract: training tokenises exactly the text serving renders (`chat_template.render_prompt`,
what serving/ingress.py calls) and trains only on the answers' spans of it.
"""

from __future__ import annotations

import copy

import pytest

from llmplatform import chat_template
from llmplatform.data import IGNORE_INDEX, render_chat, tokenize_messages, tokenize_record, tokenize_text, truncate_example
from llmplatform.data.records import Record

from datatest_helpers import chat

CONVO = chat("What is 2 + 3?", "5", "  And 4 + 4? ", "It is 8.", "Thanks", "You're welcome!", system="Be brief.")["messages"]

# A template of another family (ChatML-like): no BOS, role headers, its own end marker.
CHATML = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


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


def served_ids(tokenizer, messages) -> list[int]:
    """What the server feeds the engine for a chat request (serving/ingress.py `_prompt_ids`)."""
    return tokenizer(chat_template.render_prompt(tokenizer, messages), add_special_tokens=False).input_ids


@pytest.fixture
def chatml_tokenizer(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = CHATML
    return other


def test_render_is_the_tokenizers_template_which_for_llama2_tiny_is_metas_format(tokenizer):
    assert render_chat(CONVO, tokenizer) == tokenizer.apply_chat_template(CONVO, tokenize=False) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] 5 </s>"
        "<s>[INST] And 4 + 4? [/INST] It is 8. </s>"
        "<s>[INST] Thanks [/INST] You're welcome! </s>"
    )


def test_default_system_prompt_only_when_none_given_and_only_first_turn(tokenizer):
    plain = chat("hi", "hello", "bye", "ciao")["messages"]
    assert render_chat(plain, tokenizer) == "<s>[INST] hi [/INST] hello </s><s>[INST] bye [/INST] ciao </s>"
    assert render_chat(plain, tokenizer, system_prompt="Sys") == "<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] bye [/INST] ciao </s>"
    assert render_chat(CONVO, tokenizer, system_prompt="Other").count("<<SYS>>\nBe brief.") == 1
    assert "Other" not in render_chat(CONVO, tokenizer, system_prompt="Other")


def test_labels_cover_exactly_each_answer_through_its_eos(tokenizer):
    ex = tokenize_messages(CONVO, tokenizer)
    assert len(ex.input_ids) == len(ex.labels) == ex.full_length
    answers = [m["content"].strip() for m in CONVO if m["role"] == "assistant"]
    spans = _spans(ex.labels)
    assert len(spans) == len(answers)
    for (start, end), answer in zip(spans, answers):
        assert ex.labels[start:end] == ex.input_ids[start:end]
        assert tokenizer.decode(ex.input_ids[start:end]).strip() == answer + " </s>"
        assert ex.input_ids[end - 1] == tokenizer.eos_token_id
    assert ex.input_ids.count(tokenizer.bos_token_id) == ex.input_ids.count(tokenizer.eos_token_id) == 3
    assert all(label == IGNORE_INDEX for tok, label in zip(ex.input_ids, ex.labels) if tok == tokenizer.bos_token_id)
    masked = [t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX and t != tokenizer.bos_token_id]
    assert tokenizer.decode(masked) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] [INST] And 4 + 4? [/INST] [INST] Thanks [/INST]"


def test_ids_are_the_rendered_text_tokenised_as_serving_does(tokenizer):
    ex = tokenize_messages(CONVO, tokenizer)
    assert ex.input_ids == tokenizer(render_chat(CONVO, tokenizer), add_special_tokens=False).input_ids


@pytest.mark.parametrize("convo", [chat("hi", "hello")["messages"], CONVO], ids=["one-turn", "system-and-three-turns"])
@pytest.mark.parametrize("which", ["llama2-tiny", "chatml"])
def test_every_served_prompt_is_the_training_ids_before_that_answer(tokenizer, chatml_tokenizer, convo, which):
    """For each answer k: what the server tokenises for the conversation up to k's question is
    exactly the training sequence up to the first trained token of answer k, and the rendered
    training text starts with the served text."""
    tok = tokenizer if which == "llama2-tiny" else chatml_tokenizer
    ex = tokenize_messages(convo, tok)
    starts = [start for start, _ in _spans(ex.labels)]
    answer_at = [k for k, m in enumerate(convo) if m["role"] == "assistant"]
    assert len(starts) == len(answer_at)
    for start, k in zip(starts, answer_at):
        served_text = chat_template.render_prompt(tok, convo[:k])
        assert render_chat(convo, tok).startswith(served_text)
        assert served_ids(tok, convo[:k]) == ex.input_ids[:start]


def test_the_mask_follows_another_template(chatml_tokenizer):
    ex = tokenize_messages(chat("hi", "hello", "bye", "ciao", system="S")["messages"], chatml_tokenizer)
    trained = [tokenizer_text.strip() for tokenizer_text in
               (chatml_tokenizer.decode(ex.input_ids[s:e]) for s, e in _spans(ex.labels))]
    assert trained == ["hello<|end|>", "ciao<|end|>"]


def test_weight_zero_masks_that_answer_only(tokenizer):
    convo = chat("q1", "first answer", "q2", "second answer")["messages"]
    convo[1] = {**convo[1], "weight": 0}
    ex = tokenize_messages(convo, tokenizer)
    spans = _spans(ex.labels)
    assert len(spans) == 1
    assert tokenizer.decode(ex.input_ids[spans[0][0]:spans[0][1]]).strip() == "second answer </s>"
    # the masked answer is still in the input: same ids as without weights
    assert ex.input_ids == tokenize_messages(chat("q1", "first answer", "q2", "second answer")["messages"], tokenizer).input_ids


def test_a_tokenizer_without_template_gets_llama2s(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    assert render_chat(CONVO, bare) == render_chat(CONVO, tokenizer)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"messages\[1\].*prefix"):
        tokenize_messages(chat("hi", "hello")["messages"], odd)


def test_text_records_train_every_token_after_bos(tokenizer):
    ex = tokenize_text("Plain text, </s> included.", tokenizer, "line 3")
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert ex.input_ids.count(tokenizer.eos_token_id) == 1  # the literal "</s>" is text
    assert ex.labels == [IGNORE_INDEX] + ex.input_ids[1:]
    record = Record([], "line 3", "text", text="Plain text, </s> included.")
    assert tokenize_record(record, tokenizer, 4).input_ids == ex.input_ids[:4]


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
