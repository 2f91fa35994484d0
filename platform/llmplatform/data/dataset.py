"""From a spec's `data` section to tokenised examples, and a resumable, shardable dataset.

`load_and_tokenize(spec_data, tokenizer, split)` reads and checks the train or validation file or dataset
(bad records raise `DataError`), holds out `validation_split` of the training records when no
validation file is given (the same seed always holds out the same records), applies the chat
format, loss mask and truncation policy, and returns the kept `TokenizedExample`s.

`TokenizedDataset` iterates one epoch per `iter()` in a seeded order, sharded by rank, and
remembers its position (`state_dict()` -> {"epoch", "index"}), so a resumed run continues
with the next unseen example. Use it with `DataLoader(num_workers=0)` or `batches()`: worker
processes would each hold their own copy of the position.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

from torch.utils.data import IterableDataset

from llmplatform.data.chat import TokenizedExample, tokenize_record
from llmplatform.data.packing import collate
from llmplatform.data.records import Record, load_records


def split_holdout(records: Sequence[Record], share: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held out): round(share * n) records, at least one when share > 0, picked by seed.

    Both parts keep file order. With fewer than two records nothing is held out.
    """
    n = len(records)
    if share <= 0 or n < 2:
        return list(records), []
    n_held = min(n - 1, max(1, round(n * share)))
    held = set(random.Random(seed).sample(range(n), n_held))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def split_records(spec_data, split: str = "train", seed: int = 42) -> list[Record]:
    """The records of `split` ("train" or "validation") for a `DataSpec`."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if split == "validation" and spec_data.validation:
        return load_records(spec_data.validation, spec_data.format)
    records = load_records(spec_data.train, spec_data.format)
    if spec_data.validation:
        return records
    train, held = split_holdout(records, spec_data.validation_split, seed)
    return train if split == "train" else held


def tokenize_records(records: Sequence[Record], tokenizer, max_len: int, truncation: str = "right",
                     system_prompt: str | None = None) -> list[TokenizedExample]:
    """Tokenise records, leaving out those the truncation policy drops."""
    out = (tokenize_record(r, tokenizer, max_len, truncation, system_prompt) for r in records)
    return [example for example in out if example is not None]


def load_and_tokenize(spec_data, tokenizer, split: str = "train", seed: int = 42) -> list[TokenizedExample]:
    """Tokenised examples of `split` for a `DataSpec` (max_seq_length, truncation, system_prompt)."""
    records = split_records(spec_data, split, seed)
    return tokenize_records(records, tokenizer, spec_data.max_seq_length, spec_data.truncation, spec_data.system_prompt)


class TokenizedDataset(IterableDataset):
    """Examples or packs in a seeded per-epoch order, sharded by rank, resumable by position.

    Every rank sees `len(self)` items per epoch (the shuffled list is cut to a multiple of
    `world_size`, so DDP ranks take the same number of steps). `index` counts the items this
    rank has handed out in the current epoch; `state_dict()` saves it with the epoch.
    """

    def __init__(self, items: Sequence[TokenizedExample | dict], seed: int = 42, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(items) < world_size:
            raise ValueError(f"{len(items)} items cannot feed {world_size} ranks; add data or use fewer workers")
        self.items, self.seed, self.shuffle = list(items), seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return len(self.items) // self.world_size

    def order(self, epoch: int) -> list[int]:
        """This rank's item indices for `epoch` (the same on every call and every machine)."""
        indices = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(indices)
        return indices[: len(self) * self.world_size][self.rank :: self.world_size]

    def __getitem__(self, i: int) -> TokenizedExample | dict:
        return self.items[self.order(self.epoch)[i]]

    def __iter__(self) -> Iterator[TokenizedExample | dict]:
        order = self.order(self.epoch)
        while self.index < len(order):
            item = self.items[order[self.index]]
            self.index += 1
            yield item
        self.epoch, self.index = self.epoch + 1, 0

    def batches(self, batch_size: int, pad_id: int, drop_last: bool = False, **collate_kwargs: Any) -> Iterator[dict]:
        """Collated batches over the rest of the current epoch (see `packing.collate`)."""
        batch: list = []
        for item in self:
            batch.append(item)
            if len(batch) == batch_size:
                yield collate(batch, pad_id, **collate_kwargs)
                batch = []
        if batch and not drop_last:
            yield collate(batch, pad_id, **collate_kwargs)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position (same items, seed and world size)."""
        if state.get("seed", self.seed) != self.seed or state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"data position was saved with seed {state.get('seed')} and world_size {state.get('world_size')}, "
                             f"this dataset has {self.seed} and {self.world_size}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
