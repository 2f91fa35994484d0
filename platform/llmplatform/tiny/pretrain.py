"""Short, deterministic full-parameter pretraining that turns the random tiny Llama into a base.

A random-init model gives LoRA nothing to build on (its frozen `lm_head` caps the logits), so
the "base" kind is the random checkpoint trained briefly on plain text from
`llmplatform.tiny.text`: templated sentences, number words, sums, spelled words, counting.
Every held-out item of the `addition` and `number_words` tasks is filtered out, and the chat
format (`[INST]`) never appears, so the base scores ~0% on the tasks until fine-tuned.
Fixed seeds, a fixed data order and a fixed thread count (every CPU this process may use, at
most MAX_THREADS) make the result the same on every run on the same machine; it takes about
three CPU-minutes, 80 s of wall time on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmplatform.tiny import tasks, text

RECIPE_VERSION = 1
MAX_THREADS = 8  # past this the tiny model's matmuls gain nothing


@dataclass(frozen=True)
class PretrainRecipe:
    lines: int = 60_000  # corpus size in lines (~0.9M tokens)
    seq_len: int = 128  # tokens per training row
    batch: int = 16  # rows per step -> 2048 tokens/step
    steps: int = 250
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0
    reversals: bool = True  # include "c a t backwards is t a c" lines


RECIPE = PretrainRecipe()


def recipe_key(recipe: PretrainRecipe = RECIPE) -> str:
    """Digest of the recipe and the corpus it trains on."""
    h = hashlib.sha256(json.dumps({"v": RECIPE_VERSION, **asdict(recipe)}, sort_keys=True).encode())
    for line in corpus(recipe):
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def corpus(recipe: PretrainRecipe = RECIPE) -> list[str]:
    """The pretraining lines: mixed plain text with the tasks' held-out items removed."""
    return list(text.mixed_lines(
        recipe.lines, seed=recipe.seed,
        keep_sum=lambda a, b: not tasks.addition_held_out(a, b),
        keep_number=lambda n: not tasks.number_words_held_out(n),
        keep_reversal=(lambda w: not tasks.reverse_held_out(w)) if recipe.reversals else None))


def token_rows(model_dir: Path, recipe: PretrainRecipe = RECIPE):
    """The corpus as one `<s> line </s>` stream cut into rows: LongTensor [rows, seq_len]."""
    import sentencepiece as spm
    import torch

    sp = spm.SentencePieceProcessor(model_file=str(Path(model_dir) / "tokenizer.model"))
    stream: list[int] = []
    for ids in sp.encode(corpus(recipe)):
        stream += [sp.bos_id(), *ids, sp.eos_id()]
    rows = len(stream) // recipe.seq_len
    return torch.tensor(stream[: rows * recipe.seq_len]).view(rows, recipe.seq_len)


def pretrain(model_dir: Path, recipe: PretrainRecipe = RECIPE, log=None):
    """Load the random checkpoint in `model_dir`, train it per `recipe`, return the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmplatform.cpus import allowed_cpus

    threads = torch.get_num_threads()
    torch.set_num_threads(min(MAX_THREADS, len(allowed_cpus())))  # 1 thread took 2.1x as long on 2 cores
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            _train(model, token_rows(model_dir, recipe), recipe, log)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _train(model, rows, recipe: PretrainRecipe, log) -> None:
    import torch

    gen = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(rows), generator=gen)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_scale(s, recipe))
    model.train()
    started = time.monotonic()
    for step in range(recipe.steps):
        idx = order[(torch.arange(recipe.batch) + step * recipe.batch) % len(rows)]
        batch = rows[idx]  # [batch, seq_len]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and (step % 50 == 0 or step == recipe.steps - 1):
            tok_s = (step + 1) * batch.numel() / (time.monotonic() - started)
            log(f"pretrain step {step + 1}/{recipe.steps} loss {loss.item():.3f} {tok_s:,.0f} tok/s")


def _lr_scale(step: int, recipe: PretrainRecipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
