"""`softprompt.modeling.lean_stream.DecodeStream`: rows that join and leave a running batch between decoder
steps get exactly the tokens `lean_greedy.greedy` gives each of them alone."""

from __future__ import annotations

import torch
from transformers import T5ForConditionalGeneration

from conftest import tiny_config
from softprompt.modeling import lean_greedy
from softprompt.modeling.lean_stream import LENGTH_BUCKET, DecodeStream

MAX_NEW = 9
EOS = 1


def _t5() -> T5ForConditionalGeneration:
    """A tiny random T5 whose EOS logit is steered up, so that some answers end at once (EOS) and some run on."""
    torch.manual_seed(3)
    t5 = T5ForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        t5.lm_head.weight[EOS] *= 2.5
    return t5


def _rows(t5: T5ForConditionalGeneration, n: int) -> list[torch.Tensor]:
    """n input embeddings [L_i, d] of lengths 3..17."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 18, (n,), generator=g).tolist()
    return [t5.shared(torch.randint(3, 3000, (length,), generator=g)).detach() for length in lengths]


def _alone(t5: T5ForConditionalGeneration, row: torch.Tensor, limit: int) -> list[int]:
    """greedy's ids for one row in a batch of its own, up to and including EOS."""
    out = lean_greedy.greedy(t5, row[None], torch.ones(1, len(row), dtype=torch.long), limit, torch.float32)
    ids = out[0].tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids[1:] else ids


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        embeds[i, : len(r)], mask[i, : len(r)] = r, 1
    return embeds, mask


def test_rows_joining_and_leaving_mid_decode_get_greedys_tokens_alone() -> None:
    t5 = _t5()
    rows = _rows(t5, 14)
    limits = [MAX_NEW if i % 3 else 2 + i % 5 for i in range(len(rows))]  # some rows stop at their own limit
    expected = [_alone(t5, r, lim) for r, lim in zip(rows, limits, strict=True)]
    lengths = [len(ids) - 1 for ids in expected]
    ended_by_eos = [ids[-1] == EOS for ids in expected]
    # The test is only worth its name if rows end at many different steps, some by EOS, some by limit.
    assert len(set(lengths)) >= 4 and any(ended_by_eos) and not all(ended_by_eos)

    stream = DecodeStream(t5, torch.float32, MAX_NEW)
    # Arrivals, gated by step number: (step, rows joining before it).
    arrivals = {0: [0, 1, 2], 1: [3], 3: [4, 5, 6, 7], 4: [8], 6: [9, 10], 7: [11, 12, 13]}
    got: dict[int, list[int]] = {}
    seen_rows, seen_lengths = [], []
    step = 0
    while len(got) < len(rows):
        if step in arrivals:
            joining = arrivals[step]
            embeds, mask = _padded([rows[i] for i in joining])
            stream.admit(embeds, mask, joining, [limits[i] for i in joining])
        seen_rows.append(stream.rows)
        seen_lengths.append(stream.encoder_length)
        for done in stream.step():
            assert done.key not in got
            got[done.key] = done.ids
        step += 1
        assert step < 100
    assert [got[i] for i in range(len(rows))] == expected
    assert stream.rows == 0
    # Rows really shared steps with others of other lengths, and the padded length shrank as rows left.
    assert max(seen_rows) >= 5
    assert len(set(seen_lengths)) >= 3


def test_a_stream_matches_greedy_on_one_static_batch_and_drops_rows() -> None:
    t5 = _t5()
    rows = _rows(t5, 6)
    embeds, mask = _padded(rows)
    ref = lean_greedy.greedy(t5, embeds, mask, MAX_NEW, torch.float32)
    stream = DecodeStream(t5, torch.float32, MAX_NEW)
    stream.admit(embeds, mask, list(range(6)))
    stream.drop([2])  # an abandoned row leaves before its first step
    got: dict[int, list[int]] = {}
    while stream.rows:
        got.update((d.key, d.ids) for d in stream.step())
    assert sorted(got) == [0, 1, 3, 4, 5]
    for i, ids in got.items():
        assert ids == ref[i, : len(ids)].tolist()
        # greedy pads a row after its EOS; the stream ends it there.
        assert ids[-1] == EOS or len(ids) == MAX_NEW + 1


def test_slots_and_encoder_capacity_grow_mid_decode_without_changing_tokens() -> None:
    """A stream allocated for one short row gets more rows and longer rows while others decode."""
    t5 = _t5()
    rows = sorted(_rows(t5, 8), key=len)  # shortest first, so that every join may need a longer cache
    expected = [_alone(t5, r, MAX_NEW) for r in rows]
    stream = DecodeStream(t5, torch.float32, MAX_NEW, slots=1)
    arrivals = {0: [0], 1: [1, 2], 2: [3], 3: [4, 5, 6, 7]}
    got: dict[int, list[int]] = {}
    slots, capacities = {stream.slots}, {stream.capacity}
    step = 0
    while len(got) < len(rows):
        if step in arrivals:
            joining = arrivals[step]
            embeds, mask = _padded([rows[i] for i in joining])
            stream.admit(embeds, mask, joining)
            slots.add(stream.slots)
            capacities.add(stream.capacity)
        got.update((d.key, d.ids) for d in stream.step())
        step += 1
        assert step < 100
    assert [got[i] for i in range(len(rows))] == expected
    # The slots doubled from 1 to hold 5+ rows; the capacity is a whole bucket that holds the longest row.
    assert max(slots) >= 4 and len(slots) >= 3
    assert max(capacities) >= len(rows[-1]) and max(capacities) % LENGTH_BUCKET == 0


def test_rows_leave_and_join_without_copying_the_batchs_caches() -> None:
    """Within its slots and capacity, a join or a leave writes the rows concerned and moves nobody else."""
    t5 = _t5()
    rows = _rows(t5, 7)
    stream = DecodeStream(t5, torch.float32, MAX_NEW, slots=8)
    embeds, mask = _padded(rows[:6])
    stream.admit(embeds, mask, list(range(6)))
    stream.step()
    caches = [*stream.self_k, *stream.self_v, *stream.cross_k, *stream.cross_v, stream.cross_mask]
    storage = [c.data_ptr() for c in caches]
    before = [c.clone() for c in caches]
    keys = list(stream.keys)
    assert len(keys) >= 3
    stream.drop([1])  # a middle row leaves: the last row takes its slot, nobody else moves
    assert stream.keys == [keys[0], keys[-1], *keys[2:-1]]
    layers = len(stream.self_k)
    for slot, key in enumerate(stream.keys):
        src, end = keys.index(key), len(rows[key])
        for n, (c, old) in enumerate(zip(caches, before, strict=True)):
            if 2 * layers <= n < 4 * layers:  # cross-attention: the row's own encoder positions
                assert torch.equal(c[slot, :, :end], old[src, :, :end])
            else:
                assert torch.equal(c[slot], old[src])
    embeds, mask = _padded(rows[6:])
    assert embeds.shape[1] <= stream.capacity  # within the capacity: nothing to grow
    stream.admit(embeds, mask, [6])
    # Same tensors throughout: no concatenation, no re-indexing, no padding copy of the running batch.
    assert [c.data_ptr() for c in caches] == storage
    assert [
        c.data_ptr() for c in (*stream.self_k, *stream.self_v, *stream.cross_k, *stream.cross_v)
    ] == storage[:-1]
    assert stream.cross_mask.data_ptr() == storage[-1]
    assert stream.rows == len(keys) and stream.keys[-1] == 6
