"""Held-out exact-match accuracy of a base model, with or without a LoRA adapter.

Prompts are built exactly as in training (the tokens before the first trained label of
`tokenize_record`: the base's chat template up to the answer, as serving renders it), answers are decoded greedily in left-padded
batches (the fastest CPU path) up to EOS, and compared after whitespace normalisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmplatform.evaluation import scorers

IGNORE = -100


def prompt_and_answer(record, tokenizer, max_len: int = 1024) -> tuple[list[int], str]:
    """(prompt token ids, reference answer) of one chat/prompt-completion/alpaca record."""
    from llmplatform.data import tokenize_record

    example = tokenize_record(record, tokenizer, max_len)
    prompt = prompt_ids(example)
    answer = tokenizer.decode([t for t in example.labels[len(prompt):] if t != IGNORE], skip_special_tokens=True)
    return prompt, answer


def prompt_ids(example) -> list[int]:
    """The tokens of a tokenised example before its first trained label: the prompt serving sees."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    return list(example.input_ids[:first])


def load_model(base_dir: str | Path, adapter_dir: str | Path | None = None):
    """Base model (fp32, eval mode), with the adapter applied when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 24, batch_size: int = 64) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # [B, S] left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


normalize = scorers.collapse_whitespace  # the comparison exact match uses


def exact_match(prediction: str, reference: str) -> bool:
    """True when prediction and reference are equal after whitespace normalisation only (the strict
    form of the `exact_match` scorer, which also ignores case and surrounding punctuation by default)."""
    return scorers.exact_match(prediction, reference, ignore_case=False, ignore_punctuation=False) == 1.0


def exact_match_accuracy(base_dir: str | Path, eval_path: str | Path, adapter_dir: str | Path | None = None, limit: int | None = None) -> float:
    """Share of held-out records whose greedy answer matches the reference exactly."""
    from llmplatform.data import load_records
    from llmplatform.training.model_setup import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    records = load_records(str(eval_path))[:limit]
    pairs = [prompt_and_answer(r, tokenizer) for r in records]
    answers = generate(load_model(base_dir, adapter_dir), tokenizer, [p for p, _ in pairs])
    return sum(exact_match(a, ref) for a, (_, ref) in zip(answers, pairs)) / max(len(pairs), 1)
