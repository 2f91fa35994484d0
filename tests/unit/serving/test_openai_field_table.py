"""The OpenAI request-field table: each field works or is refused (400 naming field and engine),
the docs list is the table, and the engines' sampling pieces (hf logits, vLLM keywords) do what
the table says. No Ray: the real hf engine on llama2-tiny runs in-process."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from llmplatform.serving import openai_schema as S
from llmplatform.serving.engines import GenerationRequest
from llmplatform.serving.engines.vllm import logprob_entries, sampling_kwargs, structured_outputs

REPO = Path(__file__).resolve().parents[3]
USER = [{"role": "user", "content": "hi"}]

# A value for every field that is not neutral (it would change the answer): the table's verdict
# decides whether check_fields lets it through. A new field in FIELDS needs a sample here.
SAMPLES = {
    "model": "m", "messages": USER, "prompt": "hi", "max_tokens": 4, "max_completion_tokens": 4, "temperature": 0.5,
    "top_p": 0.9, "stop": ["x"], "seed": 3, "stream": True, "stream_options": {"include_usage": True}, "n": 2,
    "logprobs": 2, "top_logprobs": 2, "presence_penalty": 1.0, "frequency_penalty": 1.0, "logit_bias": {"5": 10},
    "user": "team-a", "safety_identifier": "u1", "prompt_cache_key": "k", "parallel_tool_calls": False, "echo": True,
    "ignore_eos": True, "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required",
    "functions": [{"name": "f"}], "function_call": {"name": "f"}, "best_of": 3, "suffix": "end", "store": True,
    "metadata": {"a": "b"}, "modalities": ["text", "audio"], "audio": {"voice": "alloy"},
    "prediction": {"type": "content", "content": "x"}, "web_search_options": {}, "reasoning_effort": "high",
    "verbosity": "low", "service_tier": "flex",
}


def test_every_field_has_a_sample():
    assert set(SAMPLES) == set(S.FIELDS)


@pytest.mark.parametrize("engine", S.ENGINES)
@pytest.mark.parametrize("name", sorted(S.FIELDS))
def test_each_field_works_or_is_refused_naming_field_and_engine(name, engine):
    rule = S.FIELDS[name]
    for endpoint in S.BOTH:
        body = {name: SAMPLES[name]}
        if endpoint not in rule.endpoints or rule.refusal(engine, SAMPLES[name]):
            with pytest.raises(S.FieldRefused) as err:
                S.check_fields(body, endpoint, engine)
            assert err.value.field == name and f"'{name}'" in str(err.value) and engine in str(err.value)
        else:
            S.check_fields(body, endpoint, engine)
        for neutral in rule.neutral:
            if endpoint in rule.endpoints:
                S.check_fields({name: neutral}, endpoint, engine)  # a value that changes nothing passes
        if endpoint in rule.endpoints:
            S.check_fields({name: None}, endpoint, engine)  # null is "not sent"


def test_the_docs_list_is_the_field_table():
    from llmplatform import docgen

    committed = (REPO / "docs/openai-api.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[3:5]]
            for line in committed.splitlines() if line.startswith("| `")}
    assert rows == {name: [rule.support("hf"), rule.support("vllm")] for name, rule in S.FIELDS.items()}
    assert "\n".join(docgen.field_rows()) in committed


def test_hf_takes_json_object_and_refuses_json_schema():
    S.check_fields({"response_format": {"type": "json_object"}}, S.CHAT, "hf")
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(S.FieldRefused, match="'response_format' is not supported by engine hf: `json_schema`"):
        S.check_fields({"response_format": schema}, S.CHAT, "hf")
    S.check_fields({"response_format": schema}, S.CHAT, "vllm")
    assert S.FIELDS["response_format"].support("hf") == S.PARTLY


def test_unknown_fields_and_bad_combinations_are_refused():
    with pytest.raises(S.FieldRefused, match="'top_k'.*engine hf") as err:
        S.check_fields({"model": "m", "top_k": 5}, S.CHAT, "hf")
    assert err.value.field == "top_k"
    with pytest.raises(S.FieldRefused, match="'echo'"):
        S.check_fields({"echo": True, "logprobs": 1}, S.COMPLETIONS, "vllm")


def validate_chat(body: dict, engine: str = "hf") -> S.ChatCompletionRequest:
    return S.ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **body}, context={"engine": engine})


def test_messages_developer_is_system_and_other_parts_are_refused():
    req = validate_chat({"messages": [{"role": "developer", "content": "be brief"}, *USER]})
    assert req.messages[0].template_role() == "system"
    assistant = {"role": "assistant", "content": "x", "refusal": None, "tool_calls": []}  # as clients echo them back
    validate_chat({"messages": [*USER, assistant, *USER]})
    for message, needle in [({"role": "user", "content": "x", "name": "bob"}, "'name'"),
                            ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}, "image_url"),
                            ({"role": "tool", "content": "x", "tool_call_id": "1"}, "role")]:
        with pytest.raises(ValidationError, match=needle) as err:
            validate_chat({"messages": [message]}, "vllm")
        assert "messages" in str(err.value)
    with pytest.raises(ValidationError, match="engine vllm"):
        validate_chat({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "vllm")


def test_logprob_and_sampling_bounds():
    assert validate_chat({"logprobs": True, "top_logprobs": 3}).top_k_logprobs() == 3
    assert validate_chat({"logprobs": True}).top_k_logprobs() == 0
    assert validate_chat({}).top_k_logprobs() is None
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        validate_chat({"top_logprobs": 3})
    for bad in ({"top_logprobs": 21, "logprobs": True}, {"presence_penalty": 2.5}, {"logit_bias": {"3": 101}},
                {"response_format": {"type": "yaml"}}, {"response_format": {"type": "json_schema"}}):
        with pytest.raises(ValidationError):
            validate_chat(bad)
    comp = S.CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 5})
    assert comp.top_k_logprobs() == 5


def test_engine_fields_apply_the_deployments_limits():
    req = validate_chat({"n": 3, "logit_bias": {"7": -100}, "frequency_penalty": 0.5, "user": "team-a"})
    fields = S.engine_fields(req, vocab_size=100, max_n=4)
    assert fields["n"] == 3 and fields["logit_bias"] == {7: -100} and fields["frequency_penalty"] == 0.5
    assert req.request_metadata() == {"user": "team-a"}
    with pytest.raises(S.FieldRefused, match="limits.max_n") as err:
        S.engine_fields(validate_chat({"n": 5}), vocab_size=100, max_n=4)
    assert err.value.field == "n"
    with pytest.raises(S.FieldRefused, match="0..99"):
        S.engine_fields(validate_chat({"logit_bias": {"100": 1}}), vocab_size=100, max_n=4)


def test_byte_fallback_pieces_are_one_byte_and_word_markers_spaces():
    assert S.token_text("\u2581sea") == (" sea", list(b" sea"))
    assert S.token_text("<0x09>") == ("\t", [9])
    assert S.token_text("<0xBA>") == ("\ufffd", [0xBA])  # part of a character: the bytes still rebuild the text
    assert S.token_text("<0xZZ>") == ("<0xZZ>", list(b"<0xZZ>"))


def test_logprobs_render_in_openai_shapes():
    entries = [{"id": 1, "logprob": -0.5, "top": [[1, -0.5], [2, -1.5]]}, {"id": 3, "logprob": -2.0, "top": [[4, -0.1]]}]
    names = {1: S.token_text("\u2581the"), 2: S.token_text("\u2581a"), 3: S.token_text("sea"), 4: S.token_text("x")}.__getitem__
    chat = S.chat_logprobs(entries, names)
    assert chat["content"][0] == {"token": " the", "logprob": -0.5, "bytes": list(b" the"),
                                  "top_logprobs": [{"token": " the", "logprob": -0.5, "bytes": list(b" the")},
                                                   {"token": " a", "logprob": -1.5, "bytes": list(b" a")}]}
    comp = S.completion_logprobs(entries, names, offset=10)
    assert comp == {"tokens": [" the", "sea"], "token_logprobs": [-0.5, -2.0], "top_logprobs": [{" the": -0.5, " a": -1.5}, {"x": -0.1}],
                    "text_offset": [10, 14]}


# ---------------------------------------------------------------------------- vLLM keywords (no vLLM needed)


def test_vllm_gets_every_sampling_field_and_structured_outputs():
    req = GenerationRequest(prompt_ids=[1, 2], max_tokens=8, n=3, seed=4, logprobs=2, presence_penalty=0.5,
                            frequency_penalty=-0.5, logit_bias={"9": 5.0}, response_format={"type": "json_object"})
    kw = sampling_kwargs(req)
    assert kw["n"] == 3 and kw["logprobs"] == 2 and kw["presence_penalty"] == 0.5 and kw["frequency_penalty"] == -0.5
    assert kw["logit_bias"] == {9: 5.0} and kw["structured_outputs"] == {"json_object": True}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert structured_outputs({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == {"json": schema}
    assert structured_outputs(None) is None and "structured_outputs" not in sampling_kwargs(GenerationRequest([1], 2))


def test_vllm_logprobs_become_entries_with_the_top_alternatives():
    class Logprob:  # the shape of vllm.logprobs.Logprob (logprob, rank, decoded_token)
        def __init__(self, logprob, rank):
            self.logprob, self.rank = logprob, rank

    step = {7: Logprob(-3.0, 4), 1: Logprob(-0.1, 1), 2: Logprob(-2.5, 2)}  # the sampled 7 is not among the top 2
    assert logprob_entries([7], [step], 2) == [{"id": 7, "logprob": -3.0, "top": [[1, -0.1], [2, -2.5]]}]


# ---------------------------------------------------------------------------- the hf engine, in-process


@pytest.fixture(scope="module")
def hf_engine():
    from llmplatform.basemodels import locate
    from llmplatform.serving.engines.hf import HFEngine

    engine = HFEngine(locate("llama2-tiny-random"), max_model_len=256)
    yield engine
    engine.shutdown()


def generate(engine, **kw) -> list[dict]:
    async def main():
        return [e async for e in engine.generate(GenerationRequest(**{"temperature": 0.0, "ignore_eos": True, **kw}))]

    return asyncio.run(main())


def texts(events: list[dict]) -> dict[int, str]:
    out: dict[int, str] = {}
    for e in events:
        if "text" in e:
            out[e.get("index", 0)] = out.get(e.get("index", 0), "") + e["text"]
    return out


def test_hf_logprobs_are_the_models_own_scores(hf_engine):
    from transformers import AutoModelForCausalLM

    ids = hf_engine.tokenizer("Tell me about the sea").input_ids
    events = generate(hf_engine, prompt_ids=ids, max_tokens=10, logprobs=3)
    entries = [e for ev in events for e in ev.get("logprobs", [])]
    assert [e["id"] for e in entries] == events[-1]["token_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_engine.model_dir).eval()
    with torch.no_grad():
        scores = model(torch.tensor([ids + events[-1]["token_ids"]])).logits[0].float().log_softmax(-1)
    ref = sum(float(scores[len(ids) - 1 + j, e["id"]]) for j, e in enumerate(entries))
    assert math.isclose(sum(e["logprob"] for e in entries), ref, abs_tol=1e-3)
    assert all(len(e["top"]) == 3 and e["top"][0][0] == e["id"] for e in entries)  # greedy: the chosen one is the best


def test_hf_n_choices_penalties_and_logit_bias(hf_engine):
    ids = hf_engine.tokenizer("one two").input_ids
    sampled = generate(hf_engine, prompt_ids=ids, max_tokens=8, temperature=1.0, seed=11, n=3)
    assert len(texts(sampled)) == 3 and len(set(texts(sampled).values())) == 3
    assert sampled[-1]["completion_tokens"] == 24 and [c["index"] for c in sampled[-1]["choices"]] == [0, 1, 2]
    assert texts(generate(hf_engine, prompt_ids=ids, max_tokens=8, temperature=1.0, seed=11, n=3)) == texts(sampled)
    plain = generate(hf_engine, prompt_ids=ids, max_tokens=16)[-1]["token_ids"]
    penalized = generate(hf_engine, prompt_ids=ids, max_tokens=16, frequency_penalty=2.0)[-1]["token_ids"]
    assert len(set(plain)) < len(plain), "the tiny model's greedy text should repeat tokens"
    assert len(set(penalized)) > len(set(plain))
    assert generate(hf_engine, prompt_ids=ids, max_tokens=3, logit_bias={500: 100.0})[-1]["token_ids"] == [500] * 3


def test_hf_json_object_output_parses_greedy_sampled_and_tight(hf_engine):
    import json

    ids = hf_engine.tokenizer("Tell me about the sea").input_ids
    fmt = {"type": "json_object"}
    for kw in ({"max_tokens": 32}, {"max_tokens": 48, "temperature": 1.0, "seed": 3, "n": 2}, {"max_tokens": 4, "temperature": 1.0, "seed": 1}):
        events = generate(hf_engine, prompt_ids=ids, response_format=fmt, **kw)
        assert len(texts(events)) == kw.get("n", 1)
        for text in texts(events).values():
            assert isinstance(json.loads(text), dict), text
        assert events[-1]["completion_tokens"] <= kw["max_tokens"] * kw.get("n", 1)
    assert texts(generate(hf_engine, prompt_ids=ids, response_format=fmt, max_tokens=2)) == {0: "{}"}


def test_json_automaton_accepts_json_objects_only_and_closes_any_prefix():
    import json

    from llmplatform.serving.engines import json_constraint as J

    for good in ['{}', '{"a":1}', '{"a":[1,2.5e-3,true,null,{"b":"x\\u00e9"}],"c":-0}']:
        assert J.is_done(J.feed_text(J.START, good)), good
    for bad in ['{ }', '[1]', '{"a":01}', '{"a":1}}', '{"a\n":1}', '{"a":1,}', '"x"']:
        assert not J.is_done(J.feed_text(J.START, bad)), bad
    for prefix in ['{', '{"a"', '{"a":', '{"a":[1', '{"a":"x\\u0', '{"a":tr', '{"a":-', '{"a":{"b":1,', '{"a":1.5e']:
        assert isinstance(json.loads(prefix + J.closer(J.feed_text(J.START, prefix))), dict), prefix
    texts = ['{', '}', '"', 'a', ':', '1', ' x']
    # a token whose completion would not fit is passed over: with 2 tokens left, '{' then '}'
    assert J.choose(J.START, [0], texts, 2) == (0, J.feed_text(J.START, "{"))
    assert J.choose(J.feed_text(J.START, "{"), [2, 1], texts, 1)[0] == 1
    assert J.choose(J.START, [6], texts, 5) is None  # whitespace outside strings never fits
    assert J.piece_text("<0x22>") == '"' and J.piece_text("<0xE2>") is None and J.piece_text("\u2581the") == " the"


def test_json_mask_keeps_tokens_that_still_close_in_time_else_forces_the_closer():
    """vLLM's json_object mask (vllm_json): of the likeliest tokens, those after which the object closes in the tokens left."""
    from llmplatform.serving.engines import json_constraint as J

    texts = ['{', '}', '"', 'a', ':', '1', ' x', '"}', None, 'ab"']
    in_key = J.feed_text(J.START, '{"')  # closer '":0}': 4 tokens at worst
    assert J.closable(in_key, [3, 9, 6], texts, 10) == [3, 9, 6]  # room enough: every candidate stays
    assert J.closable(in_key, [3, 9], texts, 4) == [9]  # 'a' leaves '":0}' (4) after it; 'ab"' leaves ':0}' (3)
    # no candidate fits: the tokens that start the shortest completion ('"' and '"}' start '":0}'; '"}' is not a prefix)
    assert J.closable(in_key, [3], texts, 2) == [2]
    in_value = J.feed_text(J.START, '{"a":"x')  # closer '"}'
    assert J.closable(in_value, [3], texts, 1) == [2, 7]
