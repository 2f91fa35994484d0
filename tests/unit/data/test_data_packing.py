"""Packing: examples never see or predict their neighbours; batching and resumable order."""

from __future__ import annotations

import pytest
import torch

from llmplatform.data import IGNORE_INDEX, TokenizedDataset, block_causal_mask, collate, pack_examples, tokenize_messages

from datatest_helpers import chat

QA = [("What is 2 + 3?", "5"), ("Spell cat", "c a t"), ("Name a colour", "blue, or maybe a long answer about green"),
      ("Hi", "Hello there, how can I help?"), ("Count to three", "one two three"), ("Say yes", "yes")]


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [tokenize_messages(chat(q, a)["messages"], tokenizer) for q, a in QA]


def test_packs_fit_keep_every_example_and_reset_positions(examples):
    seq_len = max(len(e) for e in examples) + 10
    packs = pack_examples(examples, seq_len)
    assert len(packs) < len(examples)
    assert all(len(p["input_ids"]) <= seq_len for p in packs)
    seen = []
    for p in packs:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) == len(p["segment_ids"]) == sum(p["seq_lens"])
        start = 0
        for k, n in enumerate(p["seq_lens"]):
            assert p["position_ids"][start:start + n] == list(range(n))
            assert set(p["segment_ids"][start:start + n]) == {k + 1}
            seen.append((p["input_ids"][start:start + n], p["labels"][start:start + n]))
            start += n
    assert sorted(seen) == sorted((e.input_ids, e.labels) for e in examples)


def test_no_loss_term_predicts_across_a_boundary(examples):
    """transformers' causal LM loss pairs logits[i] with labels[i+1]; at each example's last
    token the next label is the neighbour's BOS, which is -100, so nothing is learnt across."""
    packs = pack_examples(examples, 10_000)
    (p,) = packs
    shifted = p["labels"][1:] + [IGNORE_INDEX]  # the target each position is trained on
    for i, target in enumerate(shifted):
        if target != IGNORE_INDEX:
            assert p["segment_ids"][i] == p["segment_ids"][i + 1], f"position {i} predicts into the next example"
    starts = [sum(p["seq_lens"][:k]) for k in range(len(p["seq_lens"]))]
    assert all(p["labels"][s] == IGNORE_INDEX for s in starts)


def test_block_causal_mask_shape_and_blocks():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = block_causal_mask(seg)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    additive = block_causal_mask(seg, torch.float32)
    assert torch.equal(additive[0, 0] == 0, expected) and additive.min() == torch.finfo(torch.float32).min


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("attn,packed_attention,mask_dtype", [
    ("sdpa", "mask4d", torch.bool), ("eager", "mask4d", torch.float32), ("sdpa", "position_ids", torch.bool)])
def test_packed_logits_equal_each_example_run_alone(tiny_llama, tokenizer, examples, attn, packed_attention, mask_dtype):
    tiny_llama.config._attn_implementation = attn
    packs = pack_examples(examples, 80)
    assert any(len(p["seq_lens"]) >= 2 for p in packs)
    batch = collate(packs, pad_id=0, packed_attention=packed_attention, mask_dtype=mask_dtype)
    with torch.no_grad():
        # position_ids mode: transformers only derives the blocks when no KV cache is made
        packed = tiny_llama(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits  # [B, S, V]
        for b, p in enumerate(packs):
            start = 0
            for n in p["seq_lens"]:
                alone = tiny_llama(input_ids=torch.tensor([p["input_ids"][start:start + n]])).logits[0]
                torch.testing.assert_close(packed[b, start:start + n], alone, atol=1e-5, rtol=1e-5)
                start += n
    # the check can fail: without the mask a neighbour changes the logits
    with torch.no_grad():
        leaky = tiny_llama(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(leaky, packed, atol=1e-3)


def test_packed_loss_equals_separate_losses(tiny_llama, examples):
    tiny_llama.config._attn_implementation = "sdpa"
    packs = pack_examples(examples, 10_000)
    batch = collate(packs, pad_id=0)
    with torch.no_grad():
        packed_loss = tiny_llama(**batch).loss
        total, count = 0.0, 0
        for e in examples:
            n = sum(1 for label in e.labels[1:] if label != IGNORE_INDEX)
            total += tiny_llama(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss * n
            count += n
    torch.testing.assert_close(packed_loss, total / count, atol=1e-5, rtol=1e-5)


def test_collate_right_pads_with_masks(examples):
    batch = collate(examples[:3], pad_id=0, pad_to_multiple_of=8)
    lengths = [len(e) for e in examples[:3]]
    seq = batch["input_ids"].shape[1]
    assert seq % 8 == 0 and seq >= max(lengths)
    for b, n in enumerate(lengths):
        assert batch["input_ids"][b, :n].tolist() == examples[b].input_ids
        assert batch["input_ids"][b, n:].eq(0).all() and batch["labels"][b, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (seq - n)


def test_dataset_resumes_at_the_saved_position_and_shards_disjointly():
    items = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    ds = TokenizedDataset(items, seed=7)
    full_run = [x["input_ids"][0] for _ in range(2) for x in ds]  # two epochs
    assert sorted(full_run[:10]) == list(range(10)) and full_run[:10] != full_run[10:]
    ds = TokenizedDataset(items, seed=7)
    it = iter(ds)
    first = [next(it)["input_ids"][0] for _ in range(4)]
    state = ds.state_dict()
    assert state["epoch"] == 0 and state["index"] == 4
    resumed = TokenizedDataset(items, seed=7)
    resumed.load_state_dict(state)
    rest = [x["input_ids"][0] for x in resumed] + [x["input_ids"][0] for x in resumed]
    assert first + rest == full_run
    ranks = [[x["input_ids"][0] for x in TokenizedDataset(items, seed=7, rank=r, world_size=3)] for r in range(3)]
    assert all(len(r) == 3 for r in ranks) and len(set(sum(ranks, []))) == 9
    batches = list(TokenizedDataset(items, seed=7).batches(4, pad_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
