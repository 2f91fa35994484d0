"""Conformance of the OpenAI request fields (docs/openai-api.md) on a real hf deployment, through
the real `openai` SDK, sync and streaming: logprobs are the model's own scores, `n` gives n
choices, penalties and logit_bias change greedy text, `developer` is a system turn, and refused
fields get a 400 naming the field and the engine. One deployment for the module (colocated: one
replica, the quickest to start)."""

from __future__ import annotations

import math

import openai
import pytest

from conftest import BASE

pytestmark = pytest.mark.integration

USER = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def fields_app(serving_env):
    from llmplatform.backends.serving import deploy_spec
    from llmplatform.serving import app

    spec = {"name": "tiny-fields", "engine": "hf", "topology": "colocated", "max_model_len": 512, "route_prefix": "/fields",
            "model": {"base": BASE, "allow_dynamic_adapters": False}, "limits": {"max_n": 4}}
    status = deploy_spec(spec, serving_env["ray_address"])
    yield openai.OpenAI(base_url=status["url"], api_key="none", max_retries=0, timeout=120)
    app.delete("tiny-fields")


@pytest.fixture(scope="module")
def scorer(base_dir):
    """The model's own greedy continuation of some token ids, by a plain transformers forward per
    step: its tokens as the API names them, and the sum of their log-probabilities."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmplatform.serving.openai_schema import token_text

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()

    def greedy(prompt_ids: list[int], n: int) -> tuple[list[str], float]:
        ids, total = list(prompt_ids), 0.0
        with torch.no_grad():
            for _ in range(n):
                lp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
                ids.append(int(lp.argmax()))
                total += float(lp[ids[-1]])
        return [token_text(p)[0] for p in tok.convert_ids_to_tokens(ids[len(prompt_ids):])], total

    def chat_ids(messages) -> list[int]:
        return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids

    greedy.chat_ids, greedy.tok = chat_ids, tok
    return greedy


def stream_chat(client, **kw) -> tuple[dict[int, str], dict[int, list], object]:
    """Texts and logprob entries per choice index, and the usage, of a streamed chat completion."""
    texts: dict[int, str] = {}
    logprobs: dict[int, list] = {}
    usage = None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.logprobs and c.logprobs.content:
                logprobs.setdefault(c.index, []).extend(c.logprobs.content)
    return texts, logprobs, usage


def test_chat_logprobs_are_the_models_own_scores_sync_and_stream(fields_app, scorer):
    r = fields_app.chat.completions.create(model=BASE, messages=USER, max_tokens=12, logprobs=True, top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    tokens, total = scorer(scorer.chat_ids(USER), 12)
    assert [e.token for e in content] == tokens and math.isclose(sum(e.logprob for e in content), total, abs_tol=1e-3)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in content)  # greedy picks the best
    assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content)
    texts, logprobs, usage = stream_chat(fields_app, model=BASE, messages=USER, max_tokens=12, logprobs=True, top_logprobs=2, **GREEDY)
    assert texts[0] == r.choices[0].message.content and usage.completion_tokens == 12
    assert [(e.token, round(e.logprob, 5)) for e in logprobs[0]] == [(e.token, round(e.logprob, 5)) for e in content]


def test_completions_logprobs_sync_and_stream(fields_app, scorer):
    prompt_ids = scorer.tok("one two three").input_ids
    r = fields_app.completions.create(model=BASE, prompt="one two three", max_tokens=8, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and all(len(top) == 3 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    tokens, total = scorer(prompt_ids, 8)
    assert lp.tokens == tokens and math.isclose(sum(lp.token_logprobs), total, abs_tol=1e-3)
    streamed = []
    for chunk in fields_app.completions.create(model=BASE, prompt="one two three", max_tokens=8, logprobs=3, stream=True, **GREEDY):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.tokens:
                streamed += c.logprobs.tokens
    assert streamed == lp.tokens


def test_completions_echo_sync_and_stream(fields_app):
    r = fields_app.completions.create(model=BASE, prompt="one two", max_tokens=5, echo=True, **GREEDY)
    streamed = "".join(c.text for chunk in fields_app.completions.create(model=BASE, prompt="one two", max_tokens=5, echo=True,
                                                                         stream=True, **GREEDY) for c in chunk.choices)
    assert r.choices[0].text.startswith("one two") and streamed == r.choices[0].text


def test_n_choices_with_a_seed_sync_and_stream(fields_app):
    kw = {"model": BASE, "messages": USER, "max_tokens": 8, "temperature": 1.0, "seed": 21, "n": 3, "extra_body": {"ignore_eos": True}}
    r = fields_app.chat.completions.create(**kw)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3 and r.usage.completion_tokens == 24
    assert [c.message.content for c in fields_app.chat.completions.create(**kw).choices] == texts  # the seed reproduces all three
    streamed, _, usage = stream_chat(fields_app, **kw)
    assert [streamed[i] for i in range(3)] == texts and usage.completion_tokens == 24
    comp = fields_app.completions.create(model=BASE, prompt="one", max_tokens=6, temperature=1.0, seed=5, n=2, extra_body={"ignore_eos": True})
    assert len(comp.choices) == 2 and comp.choices[0].text != comp.choices[1].text


def test_penalties_and_logit_bias_change_greedy_text(fields_app, scorer):
    def greedy(**kw) -> str:
        return fields_app.chat.completions.create(model=BASE, messages=USER, max_tokens=24, **GREEDY, **kw).choices[0].message.content

    plain = greedy()
    assert greedy(frequency_penalty=2.0) != plain and greedy(presence_penalty=2.0) != plain
    plain_comp = fields_app.completions.create(model=BASE, prompt="one two", max_tokens=16, **GREEDY).choices[0].text
    assert fields_app.completions.create(model=BASE, prompt="one two", max_tokens=16, frequency_penalty=2.0, **GREEDY).choices[0].text != plain_comp
    word = scorer.tok.convert_tokens_to_ids("\u2581sea")
    biased = fields_app.completions.create(model=BASE, prompt="one", max_tokens=3, logit_bias={str(word): 100}, **GREEDY)
    assert biased.choices[0].text.split() == ["sea"] * 3


def test_json_object_output_parses_sync_and_stream(fields_app):
    import json

    kw = {"model": BASE, "messages": USER, "max_tokens": 40, "response_format": {"type": "json_object"}}
    r = fields_app.chat.completions.create(temperature=0, **kw)
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.usage.completion_tokens <= 40
    texts, _, _ = stream_chat(fields_app, temperature=1.0, seed=4, n=2, **kw)
    assert all(isinstance(json.loads(texts[i]), dict) for i in range(2)), texts


def test_developer_role_max_completion_tokens_and_user(fields_app):
    system = [{"role": "system", "content": "Answer in one word."}, *USER]
    developer = [{"role": "developer", "content": "Answer in one word."}, *USER]
    a = fields_app.chat.completions.create(model=BASE, messages=system, max_tokens=10, **GREEDY)
    b = fields_app.chat.completions.create(model=BASE, messages=developer, max_completion_tokens=10, user="team-a", **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content and b.usage.completion_tokens == 10
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


REFUSED = [  # (endpoint, field, value): refused by the hf engine (docs/openai-api.md)
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]),
    ("chat", "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("chat", "reasoning_effort", "high"),
    ("chat", "top_k", 5),  # not an OpenAI field at all
    ("completions", "best_of", 3),
    ("completions", "suffix", "the end"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint, field, value", REFUSED)
def test_refused_fields_get_400_naming_field_and_engine(fields_app, endpoint, field, value, stream):
    kw = {"model": BASE, "max_tokens": 4, "stream": stream, "extra_body": {field: value}}
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            fields_app.chat.completions.create(messages=USER, **kw)
        else:
            fields_app.completions.create(prompt="one", **kw)
    body = err.value.response.json()["error"]
    assert body["param"] == field and f"'{field}'" in body["message"] and "engine hf" in body["message"], body


def test_neutral_values_of_refused_fields_pass(fields_app):
    r = fields_app.chat.completions.create(model=BASE, messages=USER, max_tokens=3, tools=[], response_format={"type": "text"},
                                           store=False, n=1, **GREEDY)
    assert r.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="limits.max_n"):
        fields_app.chat.completions.create(model=BASE, messages=USER, max_tokens=3, n=5)
