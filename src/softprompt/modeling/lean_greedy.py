"""The lean T5's greedy decoding loop: a preallocated KV cache and plain batched matmuls per token.

`greedy` is token for token what `t5.generate(do_sample=False, num_beams=1)` returns, for a frozen model
where `softprompt.modeling.lean_t5.supported` holds and `plain_greedy` says the generation config adds no
logits processors (tests/modeling/test_perf_invariants.py checks it). It reuses the lean forward's kernels
(`softprompt.modeling.lean_t5`): the encoder runs once, in chunks of similar length, and each step runs
every decoder layer on one position.

The public interface: `greedy`, `plain_greedy`, `ENCODE_CHUNK_TOKENS`, `CROSS_KV_CACHE_BYTES`, and the pieces
`softprompt.modeling.lean_stream` decodes a changing batch with (`Heads`, `step_logits`, `special_tokens`,
`encoder_output`, `row_ends`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, T5ForConditionalGeneration

from softprompt.modeling.lean_t5 import (
    ACTIVATIONS,
    Weights,
    encode_stack,
    ffn,
    key_mask,
    norm_to,
    position_bias,
    rms_norm,
    self_qkv,
    split_heads,
)

# Generation settings that would change greedy decoding (logits processors, other search modes); the
# lean loop runs only when each is unset or neutral, otherwise `generate` goes through transformers.
_NEUTRAL_GENERATION = {
    "num_beams": (None, 1),
    "do_sample": (None, False),
    "num_return_sequences": (None, 1),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "remove_invalid_values": (None, False),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
}


def plain_greedy(generation_config: GenerationConfig) -> bool:
    """Whether a generation config leaves greedy decoding untouched (no logits processors), so `greedy` may
    stand in for `generate`."""
    return all(getattr(generation_config, key, None) in ok for key, ok in _NEUTRAL_GENERATION.items())


@torch.no_grad()
def greedy(
    t5: T5ForConditionalGeneration,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Greedy decoding, token for token what `t5.generate(do_sample=False, num_beams=1)` returns.

    Call it only where `supported(t5)` and `plain_greedy(t5.generation_config)` hold.

    Args:
        t5: the model.
        inputs_embeds: [B, L, d] encoder input embeddings (the prompt already in front).
        attention_mask: [B, L] 1 for real positions.
        max_new_tokens: the most tokens generated.
        dtype: the matmul compute dtype.

    Returns:
        token ids: [B, <= max_new_tokens + 1], starting with the decoder start token.
    """
    with torch.autocast(inputs_embeds.device.type, enabled=False):
        return _greedy(t5, inputs_embeds, attention_mask, max_new_tokens, Weights(dtype))


# Most encoder positions (rows x padded length) `greedy` encodes at once on a CPU. The encoder's
# activations (attention bias [b, H, l, l], feed-forward hidden [b, l, d_ff], ...) then stay those of
# one chunk whatever the batch size, each chunk is padded only to its own longest row, and the chunk's
# working set stays in cache: on a 2-core Zen 3, t5-small encoded a batch of 32 SQuAD questions 18% faster
# in chunks of 1024 positions than at once, with 360 MiB less peak memory (docs/performance.md).
# On a GPU a chunk that small would leave the device idle, so there the whole batch is one chunk.
ENCODE_CHUNK_TOKENS = {"cpu": 1024}

# Largest cross-attention key/value cache (all decoder layers, fp32) `greedy` builds. Above it, each
# step attends over the encoder output itself, folding the key and value projections into the query
# and the output, (q W_k) m^T instead of q (m W_k)^T, with the H heads as H queries of one fused
# attention: the same function from one [B, L, d] tensor instead of 2 x layers x [B, L, H * D] (12x less
# for t5-small, 24x for t5-base). Each step streams its cross-attention operands from memory either way;
# for a batch of 32 SQuAD questions (t5-small, CPU) the folded form was 3% faster and 211 MiB smaller,
# for one question the cache is 7% faster and small, so small caches are kept. Measured on a CPU only:
# elsewhere (a GPU, with memory to spare) the cache is always built.
CROSS_KV_CACHE_BYTES = {"cpu": 64 * 2**20}


def row_ends(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] padding mask -> [B] one past each row's last real position."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.to(torch.long) * positions).amax(dim=1)


def encoder_output(
    t5: T5ForConditionalGeneration,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    ends: torch.Tensor,
    weights: Weights,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """The encoder's output [B, L, d] in the compute dtype, encoding rows in chunks of similar length.

    Rows must come longest first (`ends` non-increasing); L is the longest row. Consecutive rows are
    encoded together, cut to the chunk's longest row, at most `max_tokens` positions at a time (one row at
    least; default: `ENCODE_CHUNK_TOKENS` of the device, else the whole batch). This is the same
    computation as encoding the batch at once: a real position never attends to padding (its weight is
    exactly 0). Positions past a row's end are zero, and masked wherever the output is read.
    """
    batch, length = embeds.shape[0], int(ends[0])
    budget = max_tokens or ENCODE_CHUNK_TOKENS.get(embeds.device.type) or batch * length
    out = torch.zeros(batch, length, embeds.shape[-1], dtype=weights.dtype, device=embeds.device)
    widths = ends.tolist()
    start = 0
    while start < batch:
        width = widths[start]
        stop = min(batch, start + max(1, budget // max(width, 1)))
        chunk = encode_stack(
            t5, embeds[start:stop, :width], mask[start:stop, :width], weights, training=False
        )
        out[start:stop, :width] = chunk
        start = stop
    return out


def _token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


@dataclass(frozen=True)
class Heads:
    """The decoder's attention layout at query length 1: B rows of H heads of width D."""

    batch: int
    heads: int
    d_kv: int

    @property
    def rows(self) -> int:
        """B * H, the batch dimension of the per-head matmuls."""
        return self.batch * self.heads

    def query(self, x: torch.Tensor, lin: nn.Linear, weights: Weights) -> torch.Tensor:
        """[B, 1, d] -> [B * H, 1, D] fp32."""
        return F.linear(x, weights(lin)).float().view(self.rows, 1, self.d_kv)

    def merged(self, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B * H, 1, D] -> [B, 1, H * D] in the compute dtype."""
        return o.view(self.batch, 1, self.heads * self.d_kv).to(dtype)


class SelfAttention(Protocol):
    """What `step_logits` asks of a decoder self-attention cache."""

    shape: Heads

    def attend(self, i: int, t: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer i's self-attention of q, k, v [B, H, 1, D] -> [B * H, 1, D] fp32."""
        ...


class CrossAttention(Protocol):
    """What `step_logits` asks of a cross-attention cache."""

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """Layer i's cross-attention: q [B * H, 1, D] fp32 -> [B * H, 1, D] fp32."""
        ...


class _SelfAttentionCache:
    """Every decoder layer's self-attention keys and values [B * H, steps, D] fp32, preallocated."""

    def __init__(self, first: nn.Module, layers: int, steps: int, shape: Heads, device: torch.device) -> None:
        self.shape = shape
        self.bias = position_bias(first, steps, steps, device, torch.float32)[0]  # [H, steps, steps]
        self.k = [torch.zeros(shape.rows, steps, shape.d_kv, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape.rows, steps, shape.d_kv, device=device) for _ in range(layers)]

    def attend(self, i: int, t: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer i's self-attention at step t: q, k, v [B, H, 1, D] -> [B * H, 1, D] fp32.

        Stores k and v at position t first, then attends over positions 0..t.
        """
        s = self.shape
        q = q.reshape(s.rows, 1, s.d_kv).float()
        self.k[i][:, t : t + 1] = k.reshape(s.rows, 1, s.d_kv)
        self.v[i][:, t : t + 1] = v.reshape(s.rows, 1, s.d_kv)
        bias_t = self.bias[:, t : t + 1, : t + 1]  # [H, 1, t + 1]
        scores = torch.bmm(q, self.k[i][:, : t + 1].transpose(1, 2)).view(s.batch, s.heads, 1, t + 1) + bias_t
        return torch.bmm(torch.softmax(scores, dim=-1).view(s.rows, 1, t + 1), self.v[i][:, : t + 1])


class _CrossAttention:
    """Every decoder layer's cross-attention over a fixed encoder output, for one query position.

    Per layer: keys and values [B * H, L, D] fp32, contiguous, so that every step is two plain bmm calls;
    or, when those would take more than CROSS_KV_CACHE_BYTES, W_k [H, D, d] and W_v^T [H, d, D] to attend
    over the encoder output itself (kept as [B, 1, L, d] fp32): one fused attention then reads the encoder
    output once per layer and step.
    """

    def __init__(
        self, dec: nn.Module, memory: torch.Tensor, mask: torch.Tensor, shape: Heads, weights: Weights
    ) -> None:
        self.shape = shape
        length = memory.shape[1]
        heads, d_kv, rows = shape.heads, shape.d_kv, shape.rows
        limit = CROSS_KV_CACHE_BYTES.get(memory.device.type)
        self.fold = limit is not None and len(dec.block) * 2 * rows * length * d_kv * 4 > limit
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for block in dec.block:
            cross = block.layer[1].EncDecAttention
            k, v = weights(cross.k), weights(cross.v)
            if self.fold:
                self.kv.append(
                    (k.float().view(heads, d_kv, -1), v.float().view(heads, d_kv, -1).transpose(1, 2))
                )
            else:
                kf, vf = (
                    split_heads(F.linear(memory, w), heads).reshape(rows, length, d_kv).float()
                    for w in (k, v)
                )
                self.kv.append((kf, vf))
        bias = key_mask(mask[:, :length], torch.float32)  # [B, 1, 1, L]
        if self.fold:
            self.memory: torch.Tensor | None = memory.float()[:, None]  # [B, 1, L, d]
            self.bias = bias
        else:
            self.memory = None
            self.bias = bias.expand(shape.batch, heads, 1, length).reshape(rows, 1, length)

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """Layer i's cross-attention: q [B * H, 1, D] fp32 -> [B * H, 1, D] fp32."""
        ck, cv = self.kv[i]
        if self.memory is None:
            scores = torch.bmm(q, ck.transpose(1, 2)) + self.bias
            return torch.bmm(torch.softmax(scores, dim=-1), cv)
        # ck = W_k [H, D, d], cv = W_v^T [H, d, D]; the heads are the queries of one attention
        s = self.shape
        q = q.view(s.batch, s.heads, s.d_kv).transpose(0, 1)  # [H, B, D]
        q = torch.bmm(q, ck).transpose(0, 1)  # [B, H, d]
        kv = self.memory
        o = F.scaled_dot_product_attention(q[:, None], kv, kv, attn_mask=self.bias, scale=1.0)
        return torch.bmm(o[:, 0].transpose(0, 1), cv).transpose(0, 1).reshape(s.rows, 1, s.d_kv)


def special_tokens(t5: T5ForConditionalGeneration) -> tuple[int, list[int], int | None]:
    """(decoder start, EOS ids, pad) from the generation config, else the model config, as `generate` reads them.

    Without a pad token the first EOS pads finished rows.
    """
    cfg, gen = t5.config, t5.generation_config
    start = (
        gen.decoder_start_token_id if gen.decoder_start_token_id is not None else cfg.decoder_start_token_id
    )
    eos = _token_ids(gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id)
    pad = gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id
    if pad is None and eos:
        pad = int(eos[0])
    return start, eos, pad


def step_logits(
    t5: T5ForConditionalGeneration,
    tokens: torch.Tensor,
    t: int,
    self_attn: SelfAttention,
    cross_attn: CrossAttention,
    weights: Weights,
) -> torch.Tensor:
    """One decoding step: the last tokens [B, 1] at position t -> next-token logits [B, V] fp32.

    The caches say how each row attends: this module's own (every row at step t), or
    `softprompt.modeling.lean_stream`'s (each row at its own step; t unused).
    """
    cfg, dec = t5.config, t5.decoder
    act = ACTIVATIONS[cfg.dense_act_fn]
    cd = weights.dtype
    shape = self_attn.shape
    h = dec.embed_tokens(tokens)  # [B, 1, d]
    for i, block in enumerate(dec.block):
        sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
        attn = sa.SelfAttention
        x = norm_to(sa.layer_norm, h, cd)
        o = self_attn.attend(i, t, *self_qkv(attn, x, weights))  # q, k, v [B, H, 1, D] each
        h = h + F.linear(shape.merged(o, cd), weights(attn.o))
        cross = ca.EncDecAttention
        x = norm_to(ca.layer_norm, h, cd)
        o = cross_attn.attend(i, shape.query(x, cross.q, weights))
        h = h + F.linear(shape.merged(o, cd), weights(cross.o))
        x = norm_to(ff.layer_norm, h, cd)
        h = h + ffn(ff.DenseReluDense, x, weights, act, training=False)[0]
    h = rms_norm(dec.final_layer_norm, h)
    if getattr(cfg, "scale_decoder_outputs", False):
        h = h * cfg.d_model**-0.5
    return F.linear(h[:, -1].to(cd), weights(t5.lm_head)).float()


@torch.no_grad()
def _greedy(
    t5: T5ForConditionalGeneration,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    weights: Weights,
) -> torch.Tensor:
    """Greedy decoding with a preallocated KV cache, as `generate(do_sample=False, num_beams=1)` does it.

    The encoder runs once, in chunks of similar length (`encoder_output`). Each step embeds the last
    token, runs every decoder layer on that one position (self-attention over the cache, cross-attention
    over keys/values projected once per batch, or over the encoder output with the projections folded
    into the query when such a cache would exceed `CROSS_KV_CACHE_BYTES` on a CPU), takes the argmax of
    the logits in fp32, writes `pad` for rows that already emitted EOS, and stops when every row has.
    Attention at query length 1 is small batched matmuls in fp32 (keys/values are cached in fp32), which
    is both cheaper on a CPU than the fused kernel and at least as precise.

    Returns:
        [B, 1 + steps] ids starting with the decoder start token, like `generate`.
    """
    dec = t5.decoder
    device = embeds.device
    batch = embeds.shape[0]
    start, eos_ids, pad = special_tokens(t5)
    eos = torch.tensor(eos_ids, device=device)

    # Rows longest first (the answer rows are put back in the caller's order at the end), so that the
    # encoder's chunks are runs of similar length.
    ends = row_ends(mask)
    order = torch.argsort(ends, descending=True, stable=True)
    embeds, mask, ends = embeds[order], mask[order], ends[order]
    memory = encoder_output(t5, embeds, mask, ends, weights)  # [B, L, d]
    first = dec.block[0].layer[0].SelfAttention
    shape = Heads(batch, first.n_heads, first.key_value_proj_dim)
    cross_attn = _CrossAttention(dec, memory, mask, shape, weights)
    del memory  # the cross-attention keeps what it reads (its cache, or an fp32 copy)
    self_attn = _SelfAttentionCache(first, len(dec.block), max_new_tokens, shape, device)

    tokens = torch.full((batch, 1), start, dtype=torch.long, device=device)
    out = [tokens]
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        nxt = step_logits(t5, tokens, t, self_attn, cross_attn, weights).argmax(dim=-1)
        if pad is not None:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        tokens = nxt[:, None]
        out.append(tokens)
        if len(eos):
            unfinished &= ~torch.isin(nxt, eos)
            if not bool(unfinished.any()):
                break
    return torch.cat(out, dim=1)[torch.argsort(order)]
