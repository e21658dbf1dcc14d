"""Tests for softprompt.data.batching: the padding collator, the bucketing batch sampler, evaluation order
and sharding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SQUAD_DEV, need
from softprompt.data.batching import (
    BucketBatchSampler,
    Collator,
    Features,
    length_sorted_indices,
    shard_indices,
)
from softprompt.tasks.squad.reader import load_examples, tokenize_examples


@pytest.fixture(scope="module")
def dev_features(tokenizer) -> list[Features]:
    """SQuAD dev tokenized with the defaults: real lengths for the collator and the sampler."""
    return tokenize_examples(load_examples(need(SQUAD_DEV)), tokenizer)


# --------------------------------------------------------------------------------------------------------
# Collation


def test_collator_pads_dynamically() -> None:
    features = [
        Features([5, 6, 1], [7, 1], 4),
        Features([5, 6, 7, 8, 1], [1], 0),
        Features([9, 1], [3, 4, 5, 1], 2),
    ]
    batch = Collator()(features)
    assert batch["input_ids"].tolist() == [[5, 6, 1, 0, 0], [5, 6, 7, 8, 1], [9, 1, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100, -100], [1, -100, -100, -100], [3, 4, 5, 1]]
    assert batch["example_index"].tolist() == [4, 0, 2]
    assert all(t.dtype == torch.long for t in batch.values())

    padded = Collator(pad_token_id=0, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape == (3, 8) and padded["labels"].shape == (3, 8)
    assert padded["attention_mask"].sum().item() == 10
    with pytest.raises(ValueError):
        Collator()([])


@pytest.mark.shared
def test_collator_on_real_features(dev_features: list[Features]) -> None:
    batch = Collator()(dev_features[:16])
    lengths = [len(f.input_ids) for f in dev_features[:16]]
    assert batch["input_ids"].shape == (16, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["labels"].shape[1] == max(len(f.labels) for f in dev_features[:16])
    assert (
        (batch["labels"] == -100).sum(1)
        == batch["labels"].shape[1] - torch.tensor([len(f.labels) for f in dev_features[:16]])
    ).all()


# --------------------------------------------------------------------------------------------------------
# Batch sampling


def epoch_batches(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("n", [1000, 1003, 5])
def test_sampler_covers_every_example(n: int, world_size: int) -> None:
    lengths = np.random.default_rng(0).integers(1, 500, n)
    batch_size = 8
    samplers = [
        BucketBatchSampler(lengths, batch_size, seed=3, rank=r, world_size=world_size, mega_batch_mult=4)
        for r in range(world_size)
    ]
    per_rank = [epoch_batches(s, 2) for s in samplers]
    global_batch = batch_size * world_size
    expected_batches = -(-n // global_batch)
    for s, batches in zip(samplers, per_rank, strict=True):
        assert len(s) == s.num_batches == len(batches) == expected_batches
        assert all(len(b) == batch_size for b in batches)
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(n))  # every example at least once
    padding = expected_batches * global_batch - n
    assert sum(seen.values()) == n + padding
    assert sum(c - 1 for c in seen.values()) == padding
    if padding == 0 and world_size == 2:
        assert not set(i for b in per_rank[0] for i in b) & set(i for b in per_rank[1] for i in b)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_drop_last_is_disjoint_and_exact(world_size: int) -> None:
    n, batch_size = 1003, 8
    lengths = np.arange(n)
    samplers = [
        BucketBatchSampler(lengths, batch_size, seed=1, rank=r, world_size=world_size, drop_last=True)
        for r in range(world_size)
    ]
    per_rank = [[i for b in epoch_batches(s, 0) for i in b] for s in samplers]
    everything = [i for rank in per_rank for i in rank]
    assert len(everything) == len(set(everything)) == n - n % (batch_size * world_size)
    assert len(samplers[0]) == n // (batch_size * world_size)


def test_sampler_determinism_and_epochs() -> None:
    lengths = np.random.default_rng(1).integers(1, 300, 500)
    a = BucketBatchSampler(lengths, 4, seed=7)
    b = BucketBatchSampler(list(lengths), 4, seed=7)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 0) != epoch_batches(a, 1)
    assert epoch_batches(a, 1) == epoch_batches(b, 1)
    assert epoch_batches(a, 0) != epoch_batches(BucketBatchSampler(lengths, 4, seed=8), 0)
    # Each epoch is a permutation of the same examples.
    assert sorted(i for bt in epoch_batches(a, 0) for i in bt) == sorted(
        i for bt in epoch_batches(a, 5) for i in bt
    )


@pytest.mark.parametrize("n", [640, 1001])
def test_global_batches_do_not_depend_on_the_split(n: int) -> None:
    """2 ranks x 8 examples see, step by step, the same examples as 1 rank x 16 (the trainer relies on it)."""
    lengths = np.random.default_rng(4).integers(1, 400, n)
    single = epoch_batches(BucketBatchSampler(lengths, 16, seed=5), 2)
    ranks = [epoch_batches(BucketBatchSampler(lengths, 8, seed=5, rank=r, world_size=2), 2) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for whole, part0, part1 in zip(single, *ranks, strict=True):
        assert sorted(whole) == sorted(part0 + part1)


def test_sampler_resumes_mid_epoch() -> None:
    lengths = np.random.default_rng(2).integers(1, 300, 200)
    for rank in (0, 1):
        sampler = BucketBatchSampler(lengths, 4, seed=0, rank=rank, world_size=2)
        full = epoch_batches(sampler, 3)
        sampler.set_epoch(3, start_batch=10)
        assert len(sampler) == len(full) - 10
        assert list(sampler) == full[10:]
        assert list(sampler) == full[10:]  # iterating again repeats, it does not drift
        sampler.set_epoch(4)
        assert len(sampler) == len(full)
    with pytest.raises(ValueError):
        sampler.set_epoch(0, start_batch=len(full) + 1)


def test_sampler_rejects_bad_arguments() -> None:
    for kwargs in ({"batch_size": 0}, {"rank": 2, "world_size": 2}, {"mega_batch_mult": 0}):
        with pytest.raises(ValueError):
            BucketBatchSampler([1, 2, 3], **{"batch_size": 2, **kwargs})
    with pytest.raises(ValueError):
        BucketBatchSampler([], 2)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 9),
    st.integers(1, 4),
    st.booleans(),
    st.integers(0, 2**32),
    st.integers(1, 5),
)
def test_sampler_properties(
    n: int, batch_size: int, world_size: int, drop_last: bool, seed: int, mult: int
) -> None:
    lengths = np.random.default_rng(seed).integers(1, 50, n)
    per_rank = [
        epoch_batches(
            BucketBatchSampler(
                lengths,
                batch_size,
                seed=seed,
                rank=r,
                world_size=world_size,
                drop_last=drop_last,
                mega_batch_mult=mult,
            ),
            1,
        )
        for r in range(world_size)
    ]
    flat = [i for batches in per_rank for b in batches for i in b]
    assert all(len(b) == batch_size for batches in per_rank for b in batches)
    assert len({len(batches) for batches in per_rank}) == 1  # ranks step in lockstep
    if drop_last:
        assert len(flat) == len(set(flat)) == n - n % (batch_size * world_size)
    else:
        assert set(flat) == set(range(n))
        assert len(flat) - n < batch_size * world_size or n < batch_size * world_size


@pytest.mark.shared
def test_sampler_groups_lengths_on_squad(dev_features: list[Features]) -> None:
    lengths = np.array([len(f.input_ids) for f in dev_features])
    sampler = BucketBatchSampler(lengths, 32, seed=0)
    bucketed = np.mean([np.ptp(lengths[b]) for b in epoch_batches(sampler, 0)])
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(lengths))
    random = np.mean([np.ptp(lengths[shuffled[i : i + 32]]) for i in range(0, len(lengths) - 31, 32)])
    assert random > 250  # SQuAD sources span ~40..512 tokens
    assert bucketed < random / 10
    # Padding work: tokens in padded batches over real tokens.
    padded = sum(32 * lengths[b].max() for b in epoch_batches(sampler, 0))
    assert padded / lengths.sum() < 1.05


# --------------------------------------------------------------------------------------------------------
# Evaluation order


def test_length_sorted_indices() -> None:
    assert length_sorted_indices([3, 9, 1, 9]) == [1, 3, 0, 2]
    assert length_sorted_indices([3, 9, 1, 9], descending=False) == [2, 0, 1, 3]
    assert length_sorted_indices([]) == []


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 100), st.integers(1, 8))
def test_shard_indices_partition_without_padding(n: int, world_size: int) -> None:
    shards = [shard_indices(n, r, world_size) for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_indices(10, 1, 3) == [1, 4, 7]


def test_shard_indices_rejects_bad_rank() -> None:
    with pytest.raises(ValueError):
        shard_indices(10, 3, 3)
