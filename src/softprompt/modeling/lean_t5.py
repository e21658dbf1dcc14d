"""softprompt's lean T5: the forward pass of a frozen T5 and its kernels, written out for speed.

When every model weight is frozen (prompt tuning, inference) and the model runs on one of
`DEVICE_TYPES`, `softprompt.modeling.model.PromptedT5` computes its loss through `logits` and decodes through
`softprompt.modeling.lean_greedy.greedy` instead of transformers' modules (docs/performance.md has the measurements): the position
bias and padding mask are combined once per stack instead of once per layer, activations are cast to
the compute dtype once per sublayer, attention keeps bf16 probabilities and a 1-byte dropout mask for
backward, dropout scales are folded into the residual adds, and greedy decoding uses a preallocated KV
cache and plain batched matmuls instead of `generate` + SDPA at query length 1.

It reads the very same weights of a transformers `T5ForConditionalGeneration` in place and computes
the same function (tests/modeling/test_perf_invariants.py and tests/modeling/test_lean_t5.py check it against transformers token for token and
loss for loss). Because it reads T5's internals (`encoder.block[i].layer[j].SelfAttention.q`,
`compute_bias`, ...), it runs only under the transformers versions it was checked against
(`CHECKED_TRANSFORMERS`); under any other version `supported` says no, once, with a warning, and
everything goes through transformers (the same results, slower). `PromptedT5(..., fast_path=False)`
and `softprompt train --no_fast_path` switch it off.

The public interface: `supported`, `logits`, `encode`, `decode`, `DEVICE_TYPES`,
`CHECKED_TRANSFORMERS`; and, for the greedy loop in `softprompt.modeling.lean_greedy` only, the kernels
`Weights`, `ACTIVATIONS`, `encode_stack`, `self_qkv`, `ffn`, `norm_to`, `rms_norm`, `split_heads`,
`position_bias`, `key_mask`. Everything else here is private to this module; dropout masks are
`softprompt.modeling.dropout`'s.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration

from softprompt.modeling.dropout import dropout_mask

# ------------------------------------------------------------------------------------------------
# The lean path: T5's forward written out for a frozen model (CPU or CUDA); lean_greedy.py decodes with it.
#
# Every function below reads the weights of a transformers `T5ForConditionalGeneration` in place
# and mirrors its computation step for step (pre-norm RMSNorm blocks, relative position bias shared
# by all layers of a stack, dropout after the embedding, after every sublayer, inside the FFN, on the
# attention probabilities, and after the final norm). Matmuls run in the compute dtype `cd` (bf16
# under bf16 autocast, else the weights' dtype); the residual stream stays in the embedding's dtype
# (fp32), exactly as under autocast.

# Activations the lean path computes in one fused kernel; anything else falls back to transformers.
# `gelu_new` is the tanh approximation, evaluated by PyTorch in fp32 for bf16 inputs.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

# The transformers versions (major.minor) whose T5 modules this file was checked against: it reads their
# attribute layout and mirrors their computation, so any other version runs transformers' own modules.
# Add a version here after tests/modeling/test_perf_invariants.py (and tests/modeling/test_cuda.py on a GPU) pass under it.
CHECKED_TRANSFORMERS: tuple[str, ...] = ("5.24", "5.25")

# Device types the lean path runs on. On an H200 it trained 2.5-3.9x faster than transformers' modules
# under autocast and decoded 2-5x faster (fewer, larger kernels; docs/performance.md), and
# tests/modeling/test_cuda.py checks it equals transformers there. `--variants no-lean` in the bench measures it.
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda")

_warned_versions: set[str] = set()


def _checked(version: str) -> bool:
    return any(version == v or version.startswith(v + ".") for v in CHECKED_TRANSFORMERS)


def transformers_version() -> str:
    """The version of the transformers module in use (`transformers.__version__`), looked up at each call."""
    import transformers  # here, not at the top: transformers may swap its lazy module object while it loads

    return transformers.__version__


def supported(t5: nn.Module) -> bool:
    """Whether the lean path covers this model: its architecture and the installed transformers.

    The architecture must be a T5 / T5 v1.1 / LM-adapted / mT5 shape with an activation in `ACTIVATIONS`;
    transformers (`transformers_version()`) must be one of `CHECKED_TRANSFORMERS`.
    Under any other version this prints one warning line (once per version) and returns False, so the
    model runs transformers' modules: the same results, slower.

    Args:
        t5: the model, normally a `T5ForConditionalGeneration`.

    Returns:
        True when `logits` and `greedy` may run this model.
    """
    cfg = getattr(t5, "config", None)
    if not isinstance(t5, T5ForConditionalGeneration) or cfg is None:
        return False
    if getattr(cfg, "dense_act_fn", None) not in ACTIVATIONS:
        return False
    blocks = list(t5.encoder.block) + list(t5.decoder.block)
    if not blocks or not all(hasattr(b.layer[-1], "DenseReluDense") for b in blocks):
        return False
    version = transformers_version()
    if not _checked(version):
        if version not in _warned_versions:
            _warned_versions.add(version)
            print(
                f"softprompt: warning: the lean T5 path was checked against transformers "
                f"{', '.join(CHECKED_TRANSFORMERS)}, not {version}; running transformers' T5 modules instead "
                "(same results, slower)",
                file=sys.stderr,
                flush=True,
            )
        return False
    return True


def logits(
    t5: T5ForConditionalGeneration,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    dtype: torch.dtype,
    *,
    training: bool,
) -> torch.Tensor:
    """Teacher-forced T5 forward from input embeddings, as `t5(inputs_embeds=..., ...).logits` computes it.

    Call it only where `supported(t5)` holds and no weight of `t5` trains (gradients flow to the inputs).

    Args:
        t5: the frozen model.
        inputs_embeds: [B, L, d] encoder input embeddings (the prompt already in front).
        attention_mask: [B, L] 1 for real positions.
        decoder_input_ids: [B, T] the labels shifted right.
        dtype: the matmul compute dtype (bf16 for bf16 runs, else the weights' dtype).
        training: apply dropout where T5 applies it.

    Returns:
        logits: [B, T, V] in `dtype`.
    """
    # The lean path casts explicitly; autocast would only add casts (e.g. of fp32 attention math).
    with torch.autocast(inputs_embeds.device.type, enabled=False):
        weights = Weights(dtype)
        enc_out = encode_stack(t5, inputs_embeds, attention_mask, weights, training)
        return _decode(t5, decoder_input_ids, enc_out, attention_mask, weights, training)


def encode(
    t5: T5ForConditionalGeneration,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The encoder half of `logits` (no dropout): what `t5.encoder(inputs_embeds=...)` returns, run once and
    decoded against as often as wanted with `decode` (rank classification scores every label this way).

    Args:
        t5: the frozen model (where `supported(t5)` holds).
        inputs_embeds: [B, L, d] encoder input embeddings (the prompt already in front).
        attention_mask: [B, L] 1 for real positions.
        dtype: the matmul compute dtype.

    Returns:
        encoder states: [B, L, d] in the residual stream's dtype (the embedding's).
    """
    with torch.autocast(inputs_embeds.device.type, enabled=False):
        return encode_stack(t5, inputs_embeds, attention_mask, Weights(dtype), training=False)


def decode(
    t5: T5ForConditionalGeneration,
    decoder_input_ids: torch.Tensor,
    encoder_states: torch.Tensor,
    attention_mask: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The decoder half of `logits` (no dropout): teacher-forced logits over `encode`'s states.

    Args:
        t5: the frozen model (where `supported(t5)` holds).
        decoder_input_ids: [B, T] the labels shifted right.
        encoder_states: [B, L, d] from `encode` (rows may repeat, e.g. once per candidate label).
        attention_mask: [B, L] the encoder's mask, 1 for real positions.
        dtype: the matmul compute dtype.

    Returns:
        logits: [B, T, V] in `dtype`.
    """
    with torch.autocast(encoder_states.device.type, enabled=False):
        return _decode(t5, decoder_input_ids, encoder_states, attention_mask, Weights(dtype), training=False)


# Dropout multiplies by the kept mask (`x * keep`) rather than zeroing with the dropped one
# (`x.masked_fill(drop, 0)`): the same numbers (up to the sign of a zero), and on a CPU about 1.8x faster
# per pass, since PyTorch's masked_fill is not vectorised there (bench/profile_train_step.py; in fp32 the
# attention probabilities' dropout was 15% of a t5-small train step). The mask stays 1 byte per element.


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p and scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    return torch.mul(x, dropout_mask(x.shape, p, x.device, keep=True)).mul_(_keep_scale(p))


def _keep_scale(p: float) -> float:
    """Inverted dropout's scale 1 / (1 - p) (0 when p = 1, where every element is dropped anyway)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _unscaled_dropout(x: torch.Tensor, p: float, training: bool) -> tuple[torch.Tensor, float]:
    """Dropout's zeroing without its 1 / (1 - p) scale, returned separately to be folded into a later op."""
    if not training or p == 0.0:
        return x, 1.0
    return torch.mul(x, dropout_mask(x.shape, p, x.device, keep=True)), _keep_scale(p)


def _residual(
    h: torch.Tensor, branch: torch.Tensor, p: float, training: bool, scale: float = 1.0
) -> torch.Tensor:
    """h + dropout(scale * branch), with both scales applied inside the addition."""
    kept, keep_scale = _unscaled_dropout(branch, p, training)
    alpha = scale * keep_scale
    return torch.add(h, kept, alpha=alpha) if alpha != 1.0 else h + kept


class _Attention(torch.autograd.Function):
    """softmax(q k^T + bias) v with dropout on the probabilities, for training.

    Scores and probabilities are kept in the compute dtype (bf16 on the fast path; the softmax itself
    accumulates in fp32), and backward saves only q, k, v, the probabilities and a 1-byte dropout mask,
    instead of the fp32 score, probability and mask tensors an unfused graph keeps. The 1 / (1 - p)
    dropout scale is applied to the [.., Lq, D] output rather than to the [.., Lq, Lk] probabilities.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        p: float,
    ) -> torch.Tensor:
        b, h, lq, d = q.shape
        lk = k.shape[2]
        qf, kf, vf = (t.reshape(b * h, -1, d) for t in (q, k, v))
        # bias + q k^T in one GEMM: the sum is accumulated in fp32 and rounded once.
        scores = torch.baddbmm(bias.expand(b, h, lq, lk).reshape(b * h, lq, lk), qf, kf.transpose(1, 2))
        prob = torch.softmax(scores.view(b, h, lq, lk), dim=-1)
        del scores
        keep = dropout_mask(prob.shape, p, prob.device, keep=True) if p > 0.0 else None
        kept = torch.mul(prob, keep) if keep is not None else prob
        out = torch.bmm(kept.view(b * h, lq, lk), vf)
        if keep is not None:
            out.mul_(_keep_scale(p))
        ctx.save_for_backward(qf, kf, vf, prob, keep)
        ctx.p = p
        return out.view(b, h, lq, d)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        qf, kf, vf, prob, keep = ctx.saved_tensors
        p = ctx.p
        b, h, lq, lk = prob.shape
        d = qf.shape[-1]
        g = grad_out.reshape(b * h, lq, d).to(qf.dtype)
        if keep is not None:
            g = g * _keep_scale(p)
            kept = torch.mul(prob, keep)
        else:
            kept = prob
        dv = torch.bmm(kept.view(b * h, lq, lk).transpose(1, 2), g) if ctx.needs_input_grad[2] else None
        del kept
        dprob = torch.bmm(g, vf.transpose(1, 2)).view(b, h, lq, lk)
        if keep is not None:
            dprob.mul_(keep)
        dscores = torch._softmax_backward_data(dprob, prob, -1, prob.dtype).view(b * h, lq, lk)
        del dprob
        dq = torch.bmm(dscores, kf).view(b, h, lq, d) if ctx.needs_input_grad[0] else None
        dk = torch.bmm(dscores.transpose(1, 2), qf).view(b, h, lk, d) if ctx.needs_input_grad[1] else None
        return dq, dk, None if dv is None else dv.view(b, h, lk, d), None, None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p: float) -> torch.Tensor:
    """Attention [B, H, Lq, D] over [B, H, Lk, D] with an additive bias broadcastable to [B, H, Lq, Lk].

    Without dropout, PyTorch's fused attention (no [Lq, Lk] tensor in memory) where it is the faster one:
    always without autograd, and in fp32 with it too. Otherwise `_Attention`, whose dropout is softprompt's
    own (`dropout_mask`: reproducible, resumable), and which in bf16 trains faster than SDPA's backward.
    Measured fwd + bwd at t5-small's [8, 6, 413, 64] on one CPU thread (bench/profile_train_step.py's
    machine): fp32 without dropout SDPA 237 ms, `_Attention` 299 ms; bf16 without dropout SDPA 132 ms,
    `_Attention` 80 ms; with dropout 0.1 SDPA has no reproducible mask, and its math fallback is no faster.
    """
    if p == 0.0:
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if not grad or q.dtype == torch.float32:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return _Attention.apply(q, k, v, bias, p)


class Weights:
    """The frozen model's linear weights in the compute dtype, cast at most once per use of this object.

    Under bf16 autocast with fp32 weights this does what autocast does (a cast per forward) without
    casting the same weight twice; for `generate`, one object serves every decoding step, so the
    decoder's weights are cast once per batch instead of once per token.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, linear: nn.Linear) -> torch.Tensor:
        w = linear.weight
        if w.dtype == self.dtype:
            return w
        key = id(linear)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = w.detach().to(self.dtype)
        return cached


class _RMSNormTo(torch.autograd.Function):
    """T5LayerNorm of an fp32 input with a frozen fp32 weight, written straight into `dtype`.

    Forward computes rstd = (mean(x^2) + eps)^-1/2 and (x * rstd) * w in fp32, rounding once into the
    output dtype: the numbers transformers' T5LayerNorm produces before autocast casts them, in three
    passes over x instead of six. Backward (input gradient only; the weight is frozen) saves just x and
    rstd: dx = rstd * (g - x * rstd^2 * mean(g * x)) with g = dy * w.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        d = x.shape[-1]
        rstd = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1).div_(d).add_(eps))
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        torch.mul(x * rstd, weight, out=out)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        g = grad_out.float() * weight
        c = torch.linalg.vecdot(g, x).unsqueeze(-1).div_(x.shape[-1]).mul_(rstd * rstd)
        return torch.addcmul(g, x, c, value=-1.0).mul_(rstd), None, None, None


def norm_to(layer_norm: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """T5LayerNorm followed by a cast to the compute dtype (the input of the next matmuls)."""
    w = layer_norm.weight
    if x.dtype != torch.float32 or w.dtype != torch.float32 or w.requires_grad:
        return rms_norm(layer_norm, x).to(dtype)
    return _RMSNormTo.apply(x, w, layer_norm.variance_epsilon, dtype)


def rms_norm(layer_norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """T5LayerNorm (RMSNorm without mean subtraction), in fp32 like transformers' implementation."""
    w = layer_norm.weight
    out = F.rms_norm(
        x.float() if x.dtype != torch.float32 else x, (x.shape[-1],), w.float(), layer_norm.variance_epsilon
    )
    return out.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) else out


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, L, H * D] -> [B, H, L, D]."""
    b, length, inner = x.shape
    return x.view(b, length, n_heads, inner // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H * D]."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def self_qkv(attn: nn.Module, x: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, L, D] of a self-attention.

    (Three GEMMs: fusing them, or all decoder layers' cross-attention k/v, into one GEMM measured no
    faster on a CPU, and the all-layer fusion slower, because of the extra layout copies.)
    """
    return tuple(split_heads(F.linear(x, weights(lin)), attn.n_heads) for lin in (attn.q, attn.k, attn.v))


def _cross_kv(
    dec: nn.Module, memory: torch.Tensor, weights: Weights
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every decoder layer's cross-attention k, v [B, H, L, D], projected from the encoder output."""
    cross = [block.layer[1].EncDecAttention for block in dec.block]
    return [
        (
            split_heads(F.linear(memory, weights(a.k)), a.n_heads),
            split_heads(F.linear(memory, weights(a.v)), a.n_heads),
        )
        for a in cross
    ]


def ffn(
    ff: nn.Module, x: torch.Tensor, weights: Weights, act: Callable, training: bool
) -> tuple[torch.Tensor, float]:
    """T5's feed-forward sublayer body (gated or not), input already normalised and in the compute dtype.

    Returns the output without the inner dropout's 1 / (1 - p) scale, and that scale.
    """
    if hasattr(ff, "wi_0"):
        hidden = act(F.linear(x, weights(ff.wi_0))) * F.linear(x, weights(ff.wi_1))
    else:
        hidden = act(F.linear(x, weights(ff.wi)))
    hidden, scale = _unscaled_dropout(hidden, ff.dropout.p, training)
    return F.linear(hidden, weights(ff.wo)), scale


def _ffn_args(
    ff_layer: nn.Module, x: torch.Tensor, weights: Weights, act: Callable, training: bool
) -> tuple[torch.Tensor, float, bool, float]:
    """`_residual` arguments for a T5LayerFF: (branch, outer dropout p, training, inner dropout scale)."""
    out, scale = ffn(ff_layer.DenseReluDense, x, weights, act, training)
    return out, ff_layer.dropout.p, training, scale


def position_bias(
    attn: nn.Module, q_len: int, k_len: int, device: torch.device, dtype: torch.dtype, causal: bool = False
) -> torch.Tensor:
    """The stack's relative position bias [1, H, q_len, k_len] in `dtype`, causally masked for the decoder.

    Masked entries hold the dtype's most negative finite value, as transformers' SDPA path writes them.
    """
    bias = attn.compute_bias(q_len, k_len, device=device).to(dtype)
    if causal:
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(1)
        bias = bias.masked_fill(future, torch.finfo(dtype).min)
    return bias


def key_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 padding mask -> additive [B, 1, 1, L] bias (0 or the dtype's most negative value)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask == 0, torch.finfo(dtype).min
    )[:, None, None, :]


def encode_stack(
    t5: T5ForConditionalGeneration,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    weights: Weights,
    training: bool,
) -> torch.Tensor:
    """T5Stack (encoder) forward from input embeddings: [B, L, d] -> [B, L, d]."""
    enc = t5.encoder
    act = ACTIVATIONS[t5.config.dense_act_fn]
    cd = weights.dtype
    length = embeds.shape[1]
    first = enc.block[0].layer[0].SelfAttention
    # Position bias and padding mask, combined once for the whole stack, in the compute dtype.
    bias = position_bias(first, length, length, embeds.device, cd)
    bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(cd).min)
    h = _dropout(embeds, enc.dropout.p, training)
    for block in enc.block:
        sa, ff = block.layer[0], block.layer[-1]
        attn = sa.SelfAttention
        x = norm_to(sa.layer_norm, h, cd)
        q, k, v = self_qkv(attn, x, weights)
        o = _merge(_attend(q, k, v, bias, attn.dropout if training else 0.0))
        h = _residual(h, F.linear(o, weights(attn.o)), sa.dropout.p, training)
        x = norm_to(ff.layer_norm, h, cd)
        h = _residual(h, *_ffn_args(ff, x, weights, act, training))
    return _dropout(rms_norm(enc.final_layer_norm, h), enc.dropout.p, training)


def _decode(
    t5: T5ForConditionalGeneration,
    decoder_input_ids: torch.Tensor,
    enc_out: torch.Tensor,
    enc_mask: torch.Tensor,
    weights: Weights,
    training: bool,
) -> torch.Tensor:
    """Teacher-forced decoder + LM head: [B, T] ids -> logits [B, T, V] in the compute dtype."""
    dec = t5.decoder
    act = ACTIVATIONS[t5.config.dense_act_fn]
    cd = weights.dtype
    length = decoder_input_ids.shape[1]
    self_bias = position_bias(
        dec.block[0].layer[0].SelfAttention, length, length, enc_out.device, cd, causal=True
    )
    cross_bias = key_mask(enc_mask, cd)
    cross_kv = _cross_kv(dec, enc_out.to(cd), weights)
    h = _dropout(dec.embed_tokens(decoder_input_ids), dec.dropout.p, training)
    for block, (k_mem, v_mem) in zip(dec.block, cross_kv, strict=True):
        sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
        attn = sa.SelfAttention
        x = norm_to(sa.layer_norm, h, cd)
        q, k, v = self_qkv(attn, x, weights)
        o = _merge(_attend(q, k, v, self_bias, attn.dropout if training else 0.0))
        h = _residual(h, F.linear(o, weights(attn.o)), sa.dropout.p, training)
        cross = ca.EncDecAttention
        x = norm_to(ca.layer_norm, h, cd)
        q = split_heads(F.linear(x, weights(cross.q)), cross.n_heads)
        o = _merge(_attend(q, k_mem, v_mem, cross_bias, cross.dropout if training else 0.0))
        h = _residual(h, F.linear(o, weights(cross.o)), ca.dropout.p, training)
        x = norm_to(ff.layer_norm, h, cd)
        h = _residual(h, *_ffn_args(ff, x, weights, act, training))
    h = _dropout(rms_norm(dec.final_layer_norm, h), dec.dropout.p, training)
    if getattr(t5.config, "scale_decoder_outputs", False):
        h = h * (t5.config.d_model**-0.5)
    return F.linear(h.to(cd), weights(t5.lm_head))
