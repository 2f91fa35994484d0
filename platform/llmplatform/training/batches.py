"""Token sequences for one worker: examples from `llmplatform.data`, a seeded order per epoch,
this rank's shard, and micro-batches addressed by one integer (the data position).

A run's data position is the count of micro-batches consumed so far. With the same seed and
world size, position `m` always names the same batch (epoch `m // per_epoch`, batch
`m % per_epoch` of that epoch's permutation), so a checkpoint only needs that integer to resume
exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmplatform.specs import FineTuneSpec


def tokenized_examples(spec: FineTuneSpec, tokenizer, split: str) -> list[dict]:
    """Tokenized (and, with `packing`, packed) examples of a split ("train" or "validation")."""
    from llmplatform import data

    examples = data.load_and_tokenize(spec.data, tokenizer, split, seed=spec.hyperparameters.seed)
    examples = [_as_dict(e) for e in examples]
    if spec.data.packing and examples:
        examples = [_as_dict(e) for e in data.pack_examples(examples, spec.data.max_seq_length)]
    return examples


def _as_dict(example) -> dict:
    if isinstance(example, dict):
        return example
    return {k: getattr(example, k) for k in ("input_ids", "labels") if hasattr(example, k)}


@dataclass(frozen=True)
class Shard:
    """This rank's view of the training examples."""

    n_examples: int
    world: int
    rank: int
    micro_batch: int
    seed: int

    @property
    def per_epoch(self) -> int:
        """Micro-batches per epoch for every rank (the same on all ranks, so DDP stays in step)."""
        return (self.n_examples // self.world) // self.micro_batch

    def indices(self, position: int) -> list[int]:
        """Example indices of the micro-batch at data position `position`."""
        epoch, slot = divmod(position, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_examples, generator=g).tolist()
        mine = order[self.rank :: self.world][: self.per_epoch * self.micro_batch]
        return mine[slot * self.micro_batch : (slot + 1) * self.micro_batch]


def eval_batches(n_examples: int, world: int, rank: int, micro_batch: int, max_batches: int | None) -> list[list[int]]:
    """This rank's validation micro-batches, in order, capped at `max_batches` per rank."""
    mine = list(range(rank, n_examples, world))
    batches = [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
    return batches[:max_batches] if max_batches else batches


def make_batch(examples: list[dict], indices: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    from llmplatform.data import collate

    batch = collate([examples[i] for i in indices], pad_id)
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def count_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """Real (non-pad) input tokens in a batch."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int((batch["input_ids"] != pad_id).sum())
