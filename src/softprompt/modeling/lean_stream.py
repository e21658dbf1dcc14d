"""Greedy decoding of a changing batch (continuous batching): rows join and leave between decoder steps.

`lean_greedy.greedy` decodes a fixed batch until its longest answer ends. `DecodeStream` holds a running
decoder batch instead: `admit` runs the encoder once for new rows and writes their cross-attention keys
and values into free slots, and `step` runs one decoder step for every row, each at its own position,
and retires the rows that emitted EOS or reached their own token limit. A row's tokens are those
`greedy` gives it alone: its self-attention sees only its own positions (the others are masked to
exactly zero weight), its cross-attention only its own encoder positions, and every other computation
is row by row (tests/modeling/test_lean_stream.py compares).

The caches are slot-addressed: preallocated for `slots` rows and an encoder-length capacity, grown
(copied) only when more rows or a longer row arrive than they hold. The active rows are always slots
0..n-1, so a step runs over views of the caches (no gather, no padding copy); a leaving row's slot
is refilled by the last active row (one row's caches copied), never by re-packing the batch. Before
this, every join and leave concatenated or re-indexed the whole batch's caches, which cost more than
the decoder step itself on a CPU (docs/performance.md, issue 24).

Runs where `PromptedT5.generate` would run `lean_greedy.greedy` (`lean_t5.supported`, `plain_greedy`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration

from softprompt.modeling.lean_greedy import (
    Heads,
    encoder_output,
    row_ends,
    special_tokens,
    step_logits,
)
from softprompt.modeling.lean_t5 import Weights, key_mask, position_bias, split_heads


@dataclass
class Finished:
    """A row that left the batch: its key and its ids, decoder start token first (as `greedy` gives them)."""

    key: Hashable
    ids: list[int]


class _RowSelfAttention:
    """Every decoder layer's self-attention over the active slots' caches, each row at its own step."""

    def __init__(self, owner: DecodeStream) -> None:
        self.owner = owner
        self.shape = owner.shape
        o, s = owner, self.shape
        self.rows = torch.arange(s.batch, device=o.device)
        self.pos = o.pos
        self.width = o.width
        # Row r's bias at query position pos[r]: later positions hold the most negative value, so their
        # softmax weight is exactly 0 and the row attends over positions 0..pos[r] only, as in `greedy`.
        self.bias = o.causal_bias[:, self.pos, : self.width].transpose(0, 1)[:, :, None]  # [B, H, 1, width]

    def attend(self, i: int, t: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer i's self-attention, row r at its own step `pos[r]` (t is unused): q, k, v [B, H, 1, D]."""
        o, s, width = self.owner, self.shape, self.width
        cache_k, cache_v = o.self_k[i][: s.batch], o.self_v[i][: s.batch]
        cache_k[self.rows, :, self.pos] = k[:, :, 0].float()
        cache_v[self.rows, :, self.pos] = v[:, :, 0].float()
        keys = cache_k[:, :, :width].reshape(s.rows, width, s.d_kv)
        values = cache_v[:, :, :width].reshape(s.rows, width, s.d_kv)
        scores = torch.bmm(q.reshape(s.rows, 1, s.d_kv).float(), keys.transpose(1, 2))
        scores = scores.view(s.batch, s.heads, 1, width) + self.bias
        return torch.bmm(torch.softmax(scores, dim=-1).view(s.rows, 1, width), values)


class _RowCrossAttention:
    """Every decoder layer's cross-attention over the active slots' encoder keys and values."""

    def __init__(self, owner: DecodeStream) -> None:
        self.owner = owner
        self.shape = owner.shape
        self.length = owner.encoder_length
        self.bias = owner.cross_bias  # once per step, not once per layer

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """Layer i's cross-attention: q [B * H, 1, D] fp32 -> [B * H, 1, D] fp32."""
        o, s, length = self.owner, self.shape, self.length
        # Views, no copy: slots [:B] and positions [:length] of the [slots, H, capacity, D] caches.
        ck = o.cross_k[i][: s.batch, :, :length].reshape(s.rows, length, s.d_kv)
        cv = o.cross_v[i][: s.batch, :, :length].reshape(s.rows, length, s.d_kv)
        scores = torch.bmm(q, ck.transpose(1, 2)) + self.bias
        return torch.bmm(torch.softmax(scores, dim=-1), cv)


class DecodeStream:
    """A running greedy-decoding batch that rows join (`admit`) and leave (`step`) between decoder steps.

    Args:
        t5: the frozen model (`lean_t5.supported`, `plain_greedy` generation config).
        dtype: the matmul compute dtype (`PromptedT5.fast_path_dtype`).
        max_new_tokens: the most tokens any row may generate (each row may ask for fewer).
        slots: rows the caches are allocated for at first (e.g. the server's `--max_batch_size`); more
            rows double them.
    """

    def __init__(
        self, t5: T5ForConditionalGeneration, dtype: torch.dtype, max_new_tokens: int, slots: int = 8
    ) -> None:
        self.t5 = t5
        self.weights = Weights(dtype)
        self.max_new_tokens = max_new_tokens
        self.device = t5.lm_head.weight.device
        self.start, eos, self.pad = special_tokens(t5)
        self.eos = torch.tensor(eos, device=self.device, dtype=torch.long)
        first = t5.decoder.block[0].layer[0].SelfAttention
        self.layers = len(t5.decoder.block)
        self.heads, self.d_kv = first.n_heads, first.key_value_proj_dim
        steps = max_new_tokens
        self.causal_bias = position_bias(first, steps, steps, self.device, torch.float32, causal=True)[0]
        self.keys: list[Hashable] = []  # the active rows', slot order
        self.limits: list[int] = []
        self.ids: list[list[int]] = []
        self._ends: list[int] = []  # each active row's encoder length
        self._allocate(max(1, slots), 0)

    def _allocate(self, slots: int, capacity: int) -> None:
        """(Re)allocate the caches for `slots` rows and `capacity` encoder positions, keeping the active rows."""
        dev, h, d, n = self.device, self.heads, self.d_kv, self.rows
        old = getattr(self, "self_k", None)

        def grown(x: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            out = torch.zeros(shape, dtype=dtype, device=dev)
            if x is not None and n:
                out[tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape, strict=True))] = x[
                    tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape, strict=True))
                ]
            return out

        f32 = torch.float32
        self_shape, cross_shape = (slots, h, self.max_new_tokens, d), (slots, h, capacity, d)
        if old is None:
            self.self_k = [grown(None, self_shape, f32) for _ in range(self.layers)]
            self.self_v = [grown(None, self_shape, f32) for _ in range(self.layers)]
            self.cross_k = [grown(None, cross_shape, f32) for _ in range(self.layers)]
            self.cross_v = [grown(None, cross_shape, f32) for _ in range(self.layers)]
            self.cross_mask = grown(None, (slots, capacity), torch.long)
            self._pos = grown(None, (slots,), torch.long)
            self._tokens = grown(None, (slots, 1), torch.long)
            return
        for caches, shape in (
            (self.self_k, self_shape),
            (self.self_v, self_shape),
            (self.cross_k, cross_shape),
            (self.cross_v, cross_shape),
        ):
            for i in range(self.layers):
                caches[i] = grown(caches[i], shape, f32)
        self.cross_mask = grown(self.cross_mask, (slots, capacity), torch.long)
        self._pos = grown(self._pos, (slots,), torch.long)
        self._tokens = grown(self._tokens, (slots, 1), torch.long)

    @property
    def slots(self) -> int:
        """Rows the caches hold now."""
        return int(self._pos.shape[0])

    @property
    def capacity(self) -> int:
        """Encoder positions per row the cross-attention caches hold now."""
        return int(self.cross_mask.shape[1])

    @property
    def rows(self) -> int:
        """Rows in the running batch (they occupy slots 0..rows-1)."""
        return len(self.keys)

    @property
    def pos(self) -> torch.Tensor:
        """[rows] each active row's next decoder position (tokens it has generated)."""
        return self._pos[: self.rows]

    @property
    def tokens(self) -> torch.Tensor:
        """[rows, 1] each active row's last token."""
        return self._tokens[: self.rows]

    @property
    def encoder_length(self) -> int:
        """The running batch's padded encoder length: its longest active row (what a step attends over)."""
        return max(self._ends, default=0)

    @property
    def shape(self) -> Heads:
        """The running batch's attention layout."""
        return Heads(self.rows, self.heads, self.d_kv)

    @property
    def width(self) -> int:
        """Self-attention positions any row has reached, plus one."""
        return int(self.pos.max()) + 1 if self.rows else 0

    @property
    def cross_bias(self) -> torch.Tensor:
        """[B * H, 1, L] additive padding mask of the cross-attention (B active rows, L `encoder_length`)."""
        b, length = self.rows, self.encoder_length
        bias = key_mask(self.cross_mask[:b, :length], torch.float32)  # [B, 1, 1, L]
        return bias.expand(b, self.heads, 1, length).reshape(b * self.heads, 1, length)

    @torch.no_grad()
    def admit(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        keys: Sequence[Hashable],
        max_new_tokens: Sequence[int] | None = None,
    ) -> None:
        """Encode new rows and write them into the next free slots of the running batch.

        Args:
            embeds: [n, L, d] encoder input embeddings (the prompt already in front).
            mask: [n, L] 1 for real positions.
            keys: one key per row, returned with its tokens by `step`.
            max_new_tokens: each row's own token limit (at most the stream's); default the stream's.
        """
        n = embeds.shape[0]
        if n == 0:
            return
        limits = list(max_new_tokens) if max_new_tokens is not None else [self.max_new_tokens] * n
        if len(keys) != n or len(limits) != n:
            raise ValueError(f"{n} rows need {n} keys and limits, got {len(keys)} and {len(limits)}")
        with torch.autocast(embeds.device.type, enabled=False):
            ends = row_ends(mask)
            order = torch.argsort(ends, descending=True, stable=True)  # the encoder wants longest first
            memory = encoder_output(self.t5, embeds[order], mask[order], ends[order], self.weights)
            memory = memory[torch.argsort(order)]
            length = memory.shape[1]
            first, stop = self.rows, self.rows + n
            if stop > self.slots or length > self.capacity:
                self._allocate(_grow(self.slots, stop), max(self.capacity, _bucket(length)))
            for i, block in enumerate(self.t5.decoder.block):
                cross = block.layer[1].EncDecAttention
                for w, cache in ((cross.k, self.cross_k[i]), (cross.v, self.cross_v[i])):
                    cache[first:stop, :, :length] = split_heads(F.linear(memory, self.weights(w)), self.heads)
                    cache[first:stop, :, length:] = 0
        self.cross_mask[first:stop] = 0
        self.cross_mask[first:stop, :length] = mask[:, :length]
        for cache in (*self.self_k, *self.self_v):
            cache[first:stop] = 0
        self._pos[first:stop] = 0
        self._tokens[first:stop] = self.start
        self.keys += list(keys)
        self.limits += [min(limit, self.max_new_tokens) for limit in limits]
        self.ids += [[self.start] for _ in range(n)]
        self._ends += ends.tolist()

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """One decoder step for every row; returns the rows that finished (EOS or their limit), now gone."""
        if not self.rows:
            return []
        with torch.autocast(self.device.type, enabled=False):
            logits = step_logits(
                self.t5, self.tokens, 0, _RowSelfAttention(self), _RowCrossAttention(self), self.weights
            )
        nxt = logits.argmax(dim=-1)
        done = torch.isin(nxt, self.eos) if len(self.eos) else torch.zeros_like(nxt, dtype=torch.bool)
        for r, token in enumerate(nxt.tolist()):
            self.ids[r].append(token)
        pos = self.pos
        pos += 1
        done |= pos >= torch.tensor(self.limits, device=self.device)
        self.tokens[:, 0] = nxt
        gone = done.nonzero().flatten().tolist()
        finished = [Finished(self.keys[r], self.ids[r]) for r in gone]
        if gone:
            self.drop(gone)
        return finished

    def drop(self, rows: Sequence[int]) -> None:
        """Remove rows (positions in the batch, i.e. slots) from it, e.g. those whose request was abandoned.

        Each freed slot below the last active one is refilled by the last active row (its caches copied,
        one row each), so the active rows stay slots 0..n-1 and nobody else's caches move.
        """
        for r in sorted(set(rows), reverse=True):  # highest first: the last row is never one still to go
            last = self.rows - 1
            if r != last:
                self._move(last, r)
            for state in (self.keys, self.limits, self.ids, self._ends):
                state.pop()

    def _move(self, src: int, dst: int) -> None:
        """Copy slot src's row into slot dst (its encoder positions only) and its book-keeping."""
        length = self._ends[src]
        for cache in (*self.self_k, *self.self_v):
            cache[dst] = cache[src]
        for cache in (*self.cross_k, *self.cross_v):
            cache[dst, :, :length] = cache[src, :, :length]
        self.cross_mask[dst] = self.cross_mask[src]
        self._pos[dst], self._tokens[dst] = self._pos[src], self._tokens[src]
        for state in (self.keys, self.limits, self.ids, self._ends):
            state[dst] = state[src]


# Encoder-length capacity grows in buckets of this many positions, not by doubling: one position of one
# slot costs 2 x layers x H x D fp32 (24 KiB for t5-small), so doubling a 300-position cache of 32 slots
# to 600 would hold ~230 MiB for nothing, while growing is rare (lengths are bounded by the tokenizer's
# limit, and the first batch of many rows is already close to the longest).
LENGTH_BUCKET = 64


def _bucket(length: int) -> int:
    """`length` rounded up to a whole `LENGTH_BUCKET`."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def _grow(have: int, need: int) -> int:
    """A cache dimension that holds `need`: `have` doubled until it does (at least `need`)."""
    size = max(have, 1)
    while size < need:
        size *= 2
    return size
