"""The pretrained `base` kind: a real small LM on plain text that has never seen the chat format.

Building it takes about two CPU-minutes, so these tests are integration-tier and build it once
in the shared model cache (content-keyed: a recipe change builds a new directory).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmplatform.tiny import ensure_tiny_model, pretrain, tasks
from llmplatform.training.evaluate import exact_match

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_base():
    return ensure_tiny_model("base")


def _mean_loss(model_dir, lines):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        losses = [model(**(b := tok(line, return_tensors="pt")), labels=b["input_ids"]).loss.item() for line in lines]
    return sum(losses) / len(losses)


def test_base_models_plain_text_far_better_than_random(tiny_base, tiny_random):
    lines = pretrain.corpus()[:40]
    base, random = _mean_loss(tiny_base, lines), _mean_loss(tiny_random, lines)
    assert random > 6.0  # ~ln(1024): chance
    assert base < 2.5, f"pretrained base loss {base:.2f} on its own kind of text"


def test_base_scores_near_zero_on_chat_tasks_before_fine_tuning(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.pad_token, tok.padding_side = tok.unk_token, "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    _, held = tasks.make_split("reverse", 10, 50)
    prompts = [tok.apply_chat_template([{"role": "user", "content": i.question}], tokenize=False) for i in held]
    batch = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=14, do_sample=False, pad_token_id=tok.pad_token_id)
    preds = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = sum(exact_match(p, i.answer) for p, i in zip(preds, held))
    assert hits <= 3, f"{hits}/50 held-out reversals right before any fine-tuning"
