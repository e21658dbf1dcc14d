"""Tokenized examples and how they are batched: :class:`Features`, the padding :class:`Collator`, the
length-bucketed training :class:`BucketBatchSampler` and the evaluation order and sharding helpers.

Task-agnostic: each task tokenizes its examples into :class:`Features` (``Task.tokenize`` in
softprompt.tasks), and everything here sees only token ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler", "Collator", "Features", "length_sorted_indices", "shard_indices"]


@dataclass(slots=True)
class Features:
    """One tokenized example.

    Attributes:
        input_ids: Source token ids ``[S_i]``, ending with EOS.
        labels: Target token ids ``[T_i]``, ending with EOS.
        example_index: Position of the example in the list that was tokenized.
        truncated: Whether the context (or, in degenerate settings, the question) was cut to fit.
    """

    input_ids: list[int]
    labels: list[int]
    example_index: int
    truncated: bool = False


# --------------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Collator:
    """Pads a list of :class:`Features` to the batch's own longest source and target.

    Attributes:
        pad_token_id: Source padding id (T5's pad, 0).
        label_pad_token_id: Label padding id, ignored by the loss (-100).
        pad_to_multiple_of: Round the padded lengths up to a multiple of this (e.g. 8 for tensor cores).
        target_multiple_of: Round the target length up to a multiple of this instead, when given.
    """

    pad_token_id: int = 0
    label_pad_token_id: int = -100
    pad_to_multiple_of: int | None = None
    target_multiple_of: int | None = None

    @staticmethod
    def _width(longest: int, multiple: int | None) -> int:
        return longest if not multiple else -(-longest // multiple) * multiple

    def __call__(self, features: Sequence[Features]) -> dict[str, torch.Tensor]:
        """Pad and stack a batch.

        Args:
            features: ``B >= 1`` tokenized examples.

        Returns:
            ``input_ids [B, S]``, ``attention_mask [B, S]`` (1 on real tokens), ``labels [B, T]`` (-100 on
            padding) and ``example_index [B]``, all int64, where S and T are the batch's longest source and
            target (rounded up to ``pad_to_multiple_of``, the target to ``target_multiple_of`` if given).
        """
        if not features:
            raise ValueError("cannot collate an empty batch")
        width_s = self._width(max(len(f.input_ids) for f in features), self.pad_to_multiple_of)
        target_multiple = self.target_multiple_of or self.pad_to_multiple_of
        width_t = self._width(max(len(f.labels) for f in features), target_multiple)
        batch = len(features)
        input_ids = torch.full((batch, width_s), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width_s), dtype=torch.long)
        labels = torch.full((batch, width_t), self.label_pad_token_id, dtype=torch.long)
        for row, f in enumerate(features):
            input_ids[row, : len(f.input_ids)] = torch.tensor(f.input_ids, dtype=torch.long)
            attention_mask[row, : len(f.input_ids)] = 1
            labels[row, : len(f.labels)] = torch.tensor(f.labels, dtype=torch.long)
        example_index = torch.tensor([f.example_index for f in features], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "example_index": example_index,
        }


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffled training batches of similar-length examples, sharded over data-parallel ranks.

    Per epoch: shuffle all indices (seeded by ``(seed, epoch)``), make the count a multiple of the global
    batch ``batch_size * world_size`` (see ``drop_last``), cut into mega-chunks of ``mega_batch_mult`` global
    batches, sort each chunk by length (longest first), cut it into global batches, shuffle the order of all
    global batches, and give rank ``r`` the strided slice ``global_batch[r::world_size]``. Striding spreads
    each global batch's lengths evenly over ranks so no rank waits for another.

    Every rank computes the same permutation from the same seed, so ranks are disjoint within an epoch and
    together visit every index.

    Args:
        lengths: Per-example lengths (e.g. source token counts), ``[N]``.
        batch_size: Examples per rank per batch.
        seed: Base seed; the same seed and epoch always give the same batches.
        rank: This process's rank.
        world_size: Number of data-parallel ranks.
        drop_last: If false (default), the last incomplete global batch is completed with examples repeated
            from the start of the epoch's permutation, like ``DistributedSampler``, so every example is seen
            and a few are seen twice. If true, the ``N % (batch_size * world_size)`` examples at the end of
            the permutation are left out of that epoch.
        mega_batch_mult: Global batches per sorted chunk; larger groups lengths more tightly but makes batch
            composition less random.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        mega_batch_mult: int = 50,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult must be >= 1, got {mega_batch_mult}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0
        self.start_batch = 0

    @property
    def num_batches(self) -> int:
        """Batches per rank in a whole epoch."""
        global_batch = self.batch_size * self.world_size
        n = len(self.lengths)
        return n // global_batch if self.drop_last else -(-n // global_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch to iterate, and the batch to start from when resuming mid-epoch.

        Args:
            epoch: The epoch number; it reseeds the shuffle.
            start_batch: Batches of this epoch already consumed; iteration skips them.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self) -> np.ndarray:
        """All global batches of the current epoch, in order, ``[num_batches, batch_size * world_size]``."""
        global_batch = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        total = self.num_batches * global_batch
        # np.resize repeats the permutation cyclically: padding comes from the start, even when N < total.
        order = np.resize(order, total)
        chunk = global_batch * self.mega_batch_mult
        for begin in range(0, total, chunk):
            part = order[begin : begin + chunk]
            order[begin : begin + chunk] = part[np.argsort(-self.lengths[part], kind="stable")]
        batches = order.reshape(self.num_batches, global_batch)
        return batches[rng.permutation(self.num_batches)]

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's batches of the current epoch from ``start_batch`` on, each ``[batch_size]``."""
        for batch in self.global_batches()[self.start_batch :]:
            yield batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        """Batches the next iteration yields: ``num_batches - start_batch``."""
        return self.num_batches - self.start_batch


def length_sorted_indices(lengths: Sequence[int], descending: bool = True) -> list[int]:
    """Indices ordering examples by length, for evaluation batches with little padding.

    Longest first by default so that an out-of-memory batch shows up at once. Ties keep index order.

    Args:
        lengths: Per-example lengths, ``[N]``.
        descending: Longest first if true.

    Returns:
        A permutation of ``range(N)``.
    """
    keys = np.asarray(lengths, dtype=np.int64)
    return np.argsort(-keys if descending else keys, kind="stable").tolist()


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's positions out of ``range(n)`` for evaluation: strided, never padded.

    Each position goes to exactly one rank, so each question is scored exactly once; shards differ in size
    by at most one. Applied to a length-sorted order, striding also gives every rank a similar workload.

    Args:
        n: Number of items.
        rank: This process's rank.
        world_size: Number of ranks.

    Returns:
        ``[rank, rank + world_size, ...]`` below ``n``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, n, world_size))
