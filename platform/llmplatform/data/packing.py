"""Packing tokenised examples into fixed-length sequences, and batching them as tensors.

`pack_examples` fills sequences of at most `seq_len` tokens first-fit, in the given order
(each example goes into the first of the recent open sequences with room). Inside a pack,
`position_ids` restart at 0 for each example and `segment_ids` number the examples 1, 2, ...,
so RoPE positions match the example run alone, and `block_causal_mask` lets each token attend
only to earlier tokens of its own example. Loss never crosses a boundary: every example starts
with BOS, whose label is -100, so after the model's causal shift the last token of one example
is never trained to predict the first token of the next.

`collate` right-pads a batch: input_ids with `pad_id`, labels with -100. Unpacked items get a
2D `attention_mask` (1 = token, 0 = pad). Packed items get `position_ids` and either a 4D
block-diagonal causal mask [B, 1, S, S] (`packed_attention="mask4d"`, bool for SDPA, or an
additive float for eager attention) or no mask at all (`"position_ids"`: transformers then
derives the blocks from the position resets, which also suits flash-attention varlen kernels;
it does so only when no KV cache is made, so call the model with `use_cache=False`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from llmplatform.data.chat import IGNORE_INDEX, TokenizedExample

OPEN_PACKS = 64  # first-fit looks back over this many unfinished packs (keeps packing O(n))


def _fields(item: Any) -> dict[str, list[int]]:
    if isinstance(item, TokenizedExample):
        return item.to_dict()
    return item


def pack_examples(examples: Sequence[TokenizedExample | dict], seq_len: int) -> list[dict[str, list[int]]]:
    """Pack examples into sequences of <= seq_len tokens.

    Each pack: input_ids, labels, position_ids (0.. per example), segment_ids (1.. per
    example), seq_lens (tokens per example, in order). Examples keep their relative order
    within a pack. An example longer than seq_len is a bug upstream (truncate first).
    """
    packs: list[dict[str, list[int]]] = []
    open_idx: list[int] = []  # indices into packs that may still have room
    for n, example in enumerate(examples):
        fields = _fields(example)
        length = len(fields["input_ids"])
        if length > seq_len:
            raise ValueError(f"example {n} has {length} tokens > seq_len {seq_len}; truncate before packing")
        if length == 0:
            continue
        target = next((i for i in open_idx if len(packs[i]["input_ids"]) + length <= seq_len), None)
        if target is None:
            packs.append({"input_ids": [], "labels": [], "position_ids": [], "segment_ids": [], "seq_lens": []})
            target = len(packs) - 1
            open_idx.append(target)
            if len(open_idx) > OPEN_PACKS:
                open_idx.pop(0)
        pack = packs[target]
        pack["input_ids"] += list(fields["input_ids"])
        pack["labels"] += list(fields["labels"])
        pack["position_ids"] += list(range(length))
        pack["segment_ids"] += [len(pack["seq_lens"]) + 1] * length
        pack["seq_lens"].append(length)
        if len(pack["input_ids"]) == seq_len:
            open_idx.remove(target)
    return packs


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """[B, S] segment ids (0 = padding) -> [B, 1, S, S] mask: query i sees key j iff same example and j <= i.

    bool: True = attend (for SDPA). A float dtype: 0 = attend, dtype's min = blocked (additive,
    for eager attention). Padding positions see only themselves, so no row is fully blocked
    (a fully blocked row turns SDPA's softmax into NaN); their labels are -100 anyway.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, S], got shape {tuple(segment_ids.shape)}")
    seq = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, S, S]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    real = (segment_ids != 0)[:, :, None]
    eye = torch.eye(seq, dtype=torch.bool, device=segment_ids.device)
    allowed = (same & causal & real) | eye  # [B, S, S]
    allowed = allowed[:, None, :, :]
    if dtype == torch.bool:
        return allowed
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=segment_ids.device), blocked)


def collate(batch: Sequence[TokenizedExample | dict], pad_id: int, pad_to_multiple_of: int | None = None,
            packed_attention: str = "mask4d", mask_dtype: torch.dtype = torch.bool) -> dict[str, torch.Tensor]:
    """Right-pad a batch into tensors ready for `model(**batch)`; see the module docstring."""
    items = [_fields(item) for item in batch]
    if not items:
        raise ValueError("collate needs at least one item")
    seq = max(len(item["input_ids"]) for item in items)
    if pad_to_multiple_of:
        seq = -(-seq // pad_to_multiple_of) * pad_to_multiple_of
    packed = all("segment_ids" in item for item in items)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([list(item[key]) + [value] * (seq - len(item[key])) for item in items], dtype=torch.long)

    out = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX)}  # [B, S]
    if not packed:
        lengths = torch.tensor([len(item["input_ids"]) for item in items])
        out["attention_mask"] = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # [B, S]
        return out
    out["position_ids"] = pad("position_ids", 0)
    if packed_attention == "mask4d":
        out["attention_mask"] = block_causal_mask(pad("segment_ids", 0), mask_dtype)  # [B, 1, S, S]
    elif packed_attention != "position_ids":
        raise ValueError(f"packed_attention must be 'mask4d' or 'position_ids', got {packed_attention!r}")
    return out
