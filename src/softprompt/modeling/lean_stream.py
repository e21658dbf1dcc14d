"""Greedy decoding of a changing batch (continuous batching): rows join and leave between decoder steps.

`lean_greedy.greedy` decodes a fixed batch until its longest answer ends. `DecodeStream` holds a running
decoder batch instead: `admit` runs the encoder once for new rows and appends their cross-attention keys
and values (the encoder length padded to the batch's longest, masked), and `step` runs one decoder step
for every row, each at its own position, and retires the rows that emitted EOS or reached their own
token limit. A row's tokens are those `greedy` gives it alone: its self-attention sees only its own
positions (the others are masked to exactly zero weight), its cross-attention only its own encoder
positions, and every other computation is row by row (tests/modeling/test_lean_stream.py compares).

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
    """Every decoder layer's self-attention keys and values [B, H, S, D] fp32, each row at its own step."""

    def __init__(self, owner: DecodeStream) -> None:
        self.owner = owner

    @property
    def shape(self) -> Heads:
        """The running batch's layout."""
        return self.owner.shape

    def attend(self, i: int, t: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer i's self-attention, row r at its own step `pos[r]` (t is unused): q, k, v [B, H, 1, D]."""
        o, s = self.owner, self.owner.shape
        rows = torch.arange(s.batch, device=q.device)
        o.self_k[i][rows, :, o.pos] = k[:, :, 0].float()
        o.self_v[i][rows, :, o.pos] = v[:, :, 0].float()
        width = o.width
        keys = o.self_k[i][:, :, :width].reshape(s.rows, width, s.d_kv)
        values = o.self_v[i][:, :, :width].reshape(s.rows, width, s.d_kv)
        # Row r's bias at query position pos[r]: later positions hold the most negative value, so their
        # softmax weight is exactly 0 and the row attends over positions 0..pos[r] only, as in `greedy`.
        bias = o.causal_bias[:, o.pos, :width].transpose(0, 1)[:, :, None]  # [B, H, 1, width]
        scores = torch.bmm(q.reshape(s.rows, 1, s.d_kv).float(), keys.transpose(1, 2))
        scores = scores.view(s.batch, s.heads, 1, width) + bias
        return torch.bmm(torch.softmax(scores, dim=-1).view(s.rows, 1, width), values)


class _RowCrossAttention:
    """Every decoder layer's cross-attention keys and values [B, H, L, D] fp32 over each row's encoder output."""

    def __init__(self, owner: DecodeStream) -> None:
        self.owner = owner

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """Layer i's cross-attention: q [B * H, 1, D] fp32 -> [B * H, 1, D] fp32."""
        o, s = self.owner, self.owner.shape
        length = o.cross_mask.shape[1]
        ck = o.cross_k[i].view(s.rows, length, s.d_kv)
        cv = o.cross_v[i].view(s.rows, length, s.d_kv)
        scores = torch.bmm(q, ck.transpose(1, 2)) + o.cross_bias
        return torch.bmm(torch.softmax(scores, dim=-1), cv)


class DecodeStream:
    """A running greedy-decoding batch that rows join (`admit`) and leave (`step`) between decoder steps.

    Args:
        t5: the frozen model (`lean_t5.supported`, `plain_greedy` generation config).
        dtype: the matmul compute dtype (`PromptedT5.fast_path_dtype`).
        max_new_tokens: the most tokens any row may generate (each row may ask for fewer).
    """

    def __init__(self, t5: T5ForConditionalGeneration, dtype: torch.dtype, max_new_tokens: int) -> None:
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
        self.keys: list[Hashable] = []
        self.limits: list[int] = []
        self.ids: list[list[int]] = []
        self._empty()

    def _empty(self) -> None:
        """Drop every row's state (the batch is empty)."""
        dev, h, d = self.device, self.heads, self.d_kv
        self.pos = torch.zeros(0, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(0, 1, dtype=torch.long, device=dev)
        shape = (0, h, self.max_new_tokens, d)
        self.self_k = [torch.zeros(shape, device=dev) for _ in range(self.layers)]
        self.self_v = [torch.zeros(shape, device=dev) for _ in range(self.layers)]
        self.cross_k = [torch.zeros(0, h, 0, d, device=dev) for _ in range(self.layers)]
        self.cross_v = [torch.zeros(0, h, 0, d, device=dev) for _ in range(self.layers)]
        self.cross_mask = torch.zeros(0, 0, dtype=torch.long, device=dev)
        self.keys, self.limits, self.ids = [], [], []

    @property
    def rows(self) -> int:
        """Rows in the running batch."""
        return len(self.keys)

    @property
    def encoder_length(self) -> int:
        """The running batch's padded encoder length (its cross-attention caches hold rows x this)."""
        return int(self.cross_mask.shape[1])

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
        """[B * H, 1, L] additive padding mask of the cross-attention."""
        b, length = self.cross_mask.shape
        bias = key_mask(self.cross_mask, torch.float32)  # [B, 1, 1, L]
        return bias.expand(b, self.heads, 1, length).reshape(b * self.heads, 1, length)

    @torch.no_grad()
    def admit(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        keys: Sequence[Hashable],
        max_new_tokens: Sequence[int] | None = None,
    ) -> None:
        """Encode new rows and append them to the running batch.

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
            mask = mask[:, : memory.shape[1]].to(torch.long)
            new_k, new_v = [], []
            for block in self.t5.decoder.block:
                cross = block.layer[1].EncDecAttention
                for w, out in ((cross.k, new_k), (cross.v, new_v)):
                    out.append(split_heads(F.linear(memory, self.weights(w)), self.heads).float())
        length = max(self.encoder_length, memory.shape[1])
        for cache, new in ((self.cross_k, new_k), (self.cross_v, new_v)):
            for i in range(self.layers):
                cache[i] = torch.cat([_pad_to(cache[i], length, 2), _pad_to(new[i], length, 2)])
        self.cross_mask = torch.cat([_pad_to(self.cross_mask, length, 1), _pad_to(mask, length, 1)])
        for cache in (self.self_k, self.self_v):
            for i in range(self.layers):
                cache[i] = torch.cat([cache[i], cache[i].new_zeros(n, *cache[i].shape[1:])])
        self.pos = torch.cat([self.pos, self.pos.new_zeros(n)])
        self.tokens = torch.cat([self.tokens, self.tokens.new_full((n, 1), self.start)])
        self.keys += list(keys)
        self.limits += [min(limit, self.max_new_tokens) for limit in limits]
        self.ids += [[self.start] for _ in range(n)]

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
        self.pos = self.pos + 1
        done |= self.pos >= torch.tensor(self.limits, device=self.device)
        self.tokens = nxt[:, None]
        gone = done.nonzero().flatten().tolist()
        finished = [Finished(self.keys[r], self.ids[r]) for r in gone]
        if gone:
            self.drop(gone)
        return finished

    def drop(self, rows: Sequence[int]) -> None:
        """Remove rows (positions in the batch) from it, e.g. those whose request was abandoned."""
        leave = set(rows)
        keep = [r for r in range(self.rows) if r not in leave]
        if not keep:
            self._empty()
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self.cross_mask[idx]
        length = int(row_ends(mask).max())  # the longest remaining row bounds the encoder length
        self.cross_mask = mask[:, :length]
        for cache in (self.cross_k, self.cross_v):
            for i in range(self.layers):
                cache[i] = cache[i][idx, :, :length].contiguous()
        for cache in (self.self_k, self.self_v):
            for i in range(self.layers):
                cache[i] = cache[i][idx]
        self.pos, self.tokens = self.pos[idx], self.tokens[idx]
        self.keys = [self.keys[r] for r in keep]
        self.limits = [self.limits[r] for r in keep]
        self.ids = [self.ids[r] for r in keep]


def _pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """x zero-padded at the end of `dim` to `length`."""
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, missing]
    return F.pad(x, pad)
