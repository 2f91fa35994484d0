"""The data position names a batch exactly: ranks are disjoint, epochs reshuffle, resume is exact."""

from llmplatform.training.batches import Shard, eval_batches


def test_ranks_get_disjoint_equal_batches_covering_an_epoch():
    shards = [Shard(n_examples=50, world=2, rank=r, micro_batch=4, seed=7) for r in (0, 1)]
    assert shards[0].per_epoch == shards[1].per_epoch == 6  # 25 per rank -> 6 full batches
    seen = [i for s in shards for pos in range(s.per_epoch) for i in s.indices(pos)]
    assert len(seen) == len(set(seen)) == 48


def test_position_is_deterministic_and_epochs_reshuffle():
    a, b = Shard(40, 1, 0, 4, seed=1), Shard(40, 1, 0, 4, seed=1)
    assert [a.indices(p) for p in range(25)] == [b.indices(p) for p in range(25)]  # a resume sees the same batches
    epoch0 = [i for p in range(10) for i in a.indices(p)]
    epoch1 = [i for p in range(10, 20) for i in a.indices(p)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1
    assert Shard(40, 1, 0, 4, seed=2).indices(0) != a.indices(0)


def test_eval_batches_cover_every_example_once_across_ranks():
    got = [i for r in range(3) for batch in eval_batches(10, 3, r, 2, None) for i in batch]
    assert sorted(got) == list(range(10))
    assert len(eval_batches(100, 1, 0, 4, max_batches=3)) == 3
