"""T5 with an optional soft prompt prepended to the encoder input.

Prompt mode freezes every weight of the model and trains only the prompt; fine-tune mode trains
all weights and uses no prompt.

Speed (see docs/performance.md): when every model weight is frozen (prompt tuning, inference) and the
model runs on a CPU or a CUDA GPU, `PromptedT5.forward` and `PromptedT5.generate` run the T5 computation written out
below (`_lean_*`) instead of transformers' modules: the position bias and padding mask are combined
once per stack instead of once per layer, activations are cast to the compute dtype once per sublayer,
attention keeps bf16 probabilities and a 1-byte dropout mask for backward, and greedy decoding uses a
preallocated KV cache and plain batched matmuls instead of `generate` + SDPA at query length 1. It
reads the very same weights and computes the same function (tests check it against transformers
token for token and loss for loss); anything it does not cover (fine-tuning, FSDP, torch.compile,
generation configs with logits processors, unknown activations) goes through transformers as before.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, T5ForConditionalGeneration

from softprompt.errors import CheckpointError
from softprompt.pretrained import is_hub_id, load_pretrained_t5, model_file, resolve_model_files
from softprompt.prompt import SoftPrompt

# What transformers needs to turn a `spiece.model` into a tokenizer when no tokenizer.json comes with it.
_SPIECE_NEEDS = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The model's tokenizer (T5's SentencePiece), from a Hub id (or the Hub cache offline) or a directory.

    Works with transformers-4-era files as the seed's checkpoints publish them (`tokenizer_config.json`,
    `special_tokens_map.json`, and `spiece.model` with or without `tokenizer.json`). Reading a
    `spiece.model` alone needs the `sentencepiece` and `protobuf` packages.
    """
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError, ImportError) as e:
        if is_hub_id(name_or_path):
            model_file(
                name_or_path, "config.json"
            )  # a Hub id not in the cache offline: say so, and how to fix it
        missing = [pkg for pkg, module in _SPIECE_NEEDS.items() if not _importable(module)]
        if missing:
            raise CheckpointError(
                f"could not load the tokenizer of {name_or_path}: reading its spiece.model needs "
                f"{' and '.join(missing)} (not installed: pip install {' '.join(missing)})"
            ) from None
        raise CheckpointError(
            f"could not load a tokenizer from {name_or_path}: give a Hub id or a directory with "
            f"spiece.model / tokenizer.json ({textwrap.shorten((str(e).splitlines() or [''])[0], 160, placeholder=' ...')})"
        ) from None


def load_t5(
    name_or_path: str | os.PathLike,
    *,
    random_init: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> T5ForConditionalGeneration:
    """Load a T5 model from the Hub (or its cache) or a local directory, without running code from any file.

    Weights come from safetensors when the model has them; a model that publishes only
    `pytorch_model.bin` (the seed's google/t5-*-lm-adapt and google/t5-v1_1-*) is read with
    `torch.load(weights_only=True)`, saying so in one line on stderr; other pickles are refused.
    The Hub's safetensors conversion is never triggered (see softprompt.pretrained).

    Args:
        name_or_path: a Hub id such as `google/t5-base-lm-adapt`, or a local directory.
        random_init: build the model from its `config.json` with random weights instead of loading
            weights (how tests and benchmarks run where no weights can be downloaded).
        seed: seeds the random init.
        dtype: load the weights in this dtype (default: as stored, float32 for T5).
        attn_implementation: `sdpa` (PyTorch's fused attention, T5's position bias as an additive mask)
            or `eager`.

    Returns:
        The model, in eval mode.
    """
    if not random_init:
        files = resolve_model_files(name_or_path)
        return load_pretrained_t5(files, dtype=dtype, attn_implementation=attn_implementation)
    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"could not read the config.json of {name_or_path}: check the Hub id or path "
            f"({str(e).strip().splitlines()[0][:160]})"
        ) from None
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def join_prompt(
    prompt: torch.Tensor,
    prompt_lengths: torch.Tensor | None,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place each row's prompt directly in front of its input.

    T5 uses relative position bias, so prepending P vectors needs no position-id bookkeeping; but
    the prompt must sit right against the text (no masked gap) for a row to see the same relative
    distances whatever the other rows' prompt lengths are. Rows are left-aligned and masked at the end.

    Args:
        prompt: [B, Pmax, H] per-row prompts (rows shorter than Pmax are padded at the end).
        prompt_lengths: [B] the number of real vectors in each row, or None when all rows use Pmax.
        embeds: [B, S, H] input token embeddings.
        attention_mask: [B, S] 1 for real tokens.

    Returns:
        inputs_embeds: [B, Pmax + S, H] and attention_mask: [B, Pmax + S].
    """
    batch, p_max, _ = prompt.shape
    prompt = prompt.to(embeds.dtype)
    mask = attention_mask.to(torch.long)
    if prompt_lengths is None or bool((prompt_lengths == p_max).all()):
        ones = torch.ones(batch, p_max, dtype=mask.dtype, device=mask.device)
        return torch.cat([prompt, embeds], dim=1), torch.cat([ones, mask], dim=1)
    seq = embeds.shape[1]
    both = torch.cat([prompt, embeds], dim=1)  # [B, Pmax + S, H]
    pos = torch.arange(p_max + seq, device=embeds.device).unsqueeze(0)  # [1, L]
    lengths = prompt_lengths.to(embeds.device).unsqueeze(1)  # [B, 1]
    in_prompt = pos < lengths
    text_pos = pos - lengths  # position inside the text for the rest
    src = torch.where(in_prompt, pos, p_max + text_pos.clamp(max=seq - 1))
    out = torch.gather(both, 1, src.unsqueeze(-1).expand(-1, -1, both.shape[-1]))
    text_mask = torch.gather(mask, 1, text_pos.clamp(0, seq - 1)) * (text_pos < seq)
    full_mask = torch.where(in_prompt, torch.ones_like(text_mask), text_mask)
    out = out * full_mask.unsqueeze(-1).to(out.dtype)
    return out, full_mask


class PromptedT5(nn.Module):
    """A T5 model, optionally driven by a soft prompt.

    Args:
        model: any `T5ForConditionalGeneration`.
        prompt: the soft prompt for prompt mode, or None for full fine-tuning. In prompt mode
            every model weight is frozen (`requires_grad=False`).
    """

    def __init__(self, model: T5ForConditionalGeneration, prompt: SoftPrompt | None = None) -> None:
        super().__init__()
        self.model = model
        self.prompt = prompt
        if prompt is not None:
            if prompt.d_model != model.config.d_model:
                raise CheckpointError(
                    f"the prompt is {prompt.d_model} wide but the model's d_model is {model.config.d_model}"
                )
            self.model.requires_grad_(False)
        self.frozen_dtype: torch.dtype | None = None
        self._lean_ok = lean_supported(model)

    @property
    def prompt_tuning(self) -> bool:
        return self.prompt is not None

    def freeze_to(self, dtype: torch.dtype) -> PromptedT5:
        """Freeze the model and store its matmul weights in `dtype` once (bf16 for bf16 runs).

        For prompt tuning and inference, where no model weight is trained: the weights of every
        `nn.Linear` (attention, feed-forward, LM head) are cast once, instead of autocast casting
        each of them on every forward pass (and, in `generate`, on every token). The embedding table,
        the layer norms and the position-bias tables stay as they are (fp32), so the residual
        stream, the prompt and the loss are computed exactly as under autocast: with bf16 this is
        the same computation as fp32 weights under bf16 autocast, at half the weight memory. An LM
        head tied to the input embedding gets its own cast copy. Afterwards `forward` and
        `generate` always run in `dtype` (they enter autocast themselves if needed).

        Never use it for full fine-tuning: it sets `requires_grad=False` on every model weight.

        Args:
            dtype: the compute dtype, e.g. `torch.bfloat16`; `torch.float32` only freezes.

        Returns:
            self.
        """
        t5 = self.model
        t5.requires_grad_(False)
        if dtype != torch.float32:
            head = getattr(t5, "lm_head", None)
            if isinstance(head, nn.Linear) and head.weight is t5.get_input_embeddings().weight:
                head.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
            for module in t5.modules():
                if isinstance(module, nn.Linear) and module.weight.dtype != dtype:
                    module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        self.frozen_dtype = dtype
        return self

    def _lean_dtype(self, device: torch.device, *, for_training: bool = True) -> torch.dtype | None:
        """The compute dtype of the lean path for this call, or None to go through transformers.

        The lean path runs on `LEAN_DEVICE_TYPES`, for unsharded models not being compiled, and (for `forward`) only
        when no model weight trains; `generate` never trains anything, so it takes the lean path in
        fine-tune mode too.
        """
        if not self._lean_ok or device.type not in LEAN_DEVICE_TYPES or hasattr(self, "unshard"):
            return None
        if torch.compiler.is_compiling():  # under --compile, let dynamo trace transformers' code instead
            return None
        if for_training and any(p.requires_grad for p in self.model.parameters()):
            return None
        if self.frozen_dtype is not None and self.frozen_dtype != torch.float32:
            return self.frozen_dtype
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.model.lm_head.weight.dtype

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast to the frozen dtype when the caller has not entered it (weights in bf16 need it)."""
        dtype = self.frozen_dtype
        if dtype is None or dtype == torch.float32 or torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer should see: the prompt alone, or every model weight."""
        return [p for p in self.parameters() if p.requires_grad]

    def encoder_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the input and put the prompt in front of it.

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            prompt: [B, P, H] per-row prompts to use instead of this model's own (a mixed-task batch).
            prompt_lengths: [B] real lengths of `prompt` rows, when they differ.

        Returns:
            inputs_embeds: [B, P + S, H] and attention_mask: [B, P + S] (P = 0 without a prompt).
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        if prompt is None and self.prompt is not None:
            prompt = self.prompt(input_ids.shape[0])
        if prompt is None:
            return embeds, attention_mask
        return join_prompt(prompt, prompt_lengths, embeds, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Teacher-forced cross-entropy of the labels.

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            labels: [B, T], -100 where padded.
            reduction: `mean` over target tokens, or `sum` (the trainer sums and divides by the
                global batch's token count so accumulation does not change the gradient).

        Returns:
            loss: a scalar.
        """
        inputs_embeds, mask = self.encoder_inputs(input_ids, attention_mask)
        decoder_input_ids = self.model._shift_right(labels)
        cd = self._lean_dtype(inputs_embeds.device)
        if cd is not None:
            # The lean path casts explicitly; autocast would only add casts (e.g. of fp32 attention math).
            with torch.autocast(inputs_embeds.device.type, enabled=False):
                weights = _Weights(cd)
                enc_out = _lean_encode(self.model, inputs_embeds, mask, weights, self.training)
                logits = _lean_decode(self.model, decoder_input_ids, enc_out, mask, weights, self.training)
        else:
            with self._autocast(inputs_embeds.device):
                logits = self.model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=mask,
                    decoder_input_ids=decoder_input_ids,
                    use_cache=False,
                ).logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction=reduction
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 32,
        prompt: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        synced_gpus: bool = False,
    ) -> torch.Tensor:
        """Greedy decoding, stopping when every row has produced EOS.

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            max_new_tokens: the longest answer, in tokens.
            prompt: optional per-row prompts [B, P, H] (see `encoder_inputs`).
            prompt_lengths: optional [B] real prompt lengths.
            synced_gpus: keep decoding until every rank is done (an FSDP-sharded model runs
                collectives in each forward, so ranks must take the same number of steps).

        Returns:
            token ids: [B, <= max_new_tokens + 1], starting with the decoder start token.
        """
        inputs_embeds, mask = self.encoder_inputs(input_ids, attention_mask, prompt, prompt_lengths)
        cd = None if synced_gpus else self._lean_dtype(inputs_embeds.device, for_training=False)
        if cd is not None and self._plain_greedy():
            with torch.autocast(inputs_embeds.device.type, enabled=False):
                return _lean_greedy(self.model, inputs_embeds, mask, max_new_tokens, _Weights(cd))
        with self._autocast(inputs_embeds.device):
            return self.model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                synced_gpus=synced_gpus,
            )

    def _plain_greedy(self) -> bool:
        """Whether the model's generation config leaves greedy decoding untouched (no logits processors)."""
        gen = self.model.generation_config
        return all(getattr(gen, key, None) in ok for key, ok in _NEUTRAL_GENERATION.items())


# ------------------------------------------------------------------------------------------------
# The lean path: T5's forward and greedy decoding written out for a frozen model (CPU or CUDA).
#
# Every function below reads the weights of a transformers `T5ForConditionalGeneration` in place
# and mirrors its computation step for step (pre-norm RMSNorm blocks, relative position bias shared
# by all layers of a stack, dropout after the embedding, after every sublayer, inside the FFN, on the
# attention probabilities, and after the final norm). Matmuls run in the compute dtype `cd` (bf16
# under bf16 autocast, else the weights' dtype); the residual stream stays in the embedding's dtype
# (fp32), exactly as under autocast.

# Activations the lean path computes in one fused kernel; anything else falls back to transformers.
# `gelu_new` is the tanh approximation, evaluated by PyTorch in fp32 for bf16 inputs.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

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


def lean_supported(t5: nn.Module) -> bool:
    """Whether the lean path covers this model's architecture (T5 / T5 v1.1 / LM-adapted / mT5 shapes)."""
    cfg = getattr(t5, "config", None)
    if not isinstance(t5, T5ForConditionalGeneration) or cfg is None:
        return False
    if getattr(cfg, "dense_act_fn", None) not in _ACTIVATIONS:
        return False
    blocks = list(t5.encoder.block) + list(t5.decoder.block)
    return bool(blocks) and all(hasattr(b.layer[-1], "DenseReluDense") for b in blocks)


# Device types the lean path runs on. On an H200 it trained 2.5-3.9x faster than transformers' modules
# under autocast and decoded 2-5x faster (fewer, larger kernels; docs/performance.md), and
# tests/test_cuda.py checks it equals transformers there. `--variants no-lean` in the bench measures it.
LEAN_DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda")

_RNG_CHUNK = 1 << 21  # 64-bit words per independently seeded chunk of a dropout mask
_rng_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool)


def _pool() -> ThreadPoolExecutor:
    """The dropout-mask thread pool of this process (a forked child gets its own, fresh one)."""
    global _rng_pool
    if _rng_pool is None or _rng_pool[0] != os.getpid():
        workers = max(2, torch.get_num_threads())
        _rng_pool = (
            os.getpid(),
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="softprompt-rng"),
        )
    return _rng_pool[1]


def _cpu_drop_mask(n: int, threshold: int, seed: int) -> torch.Tensor:
    """[n] bool, True where a 32-bit random word falls below `threshold` (as a signed int32).

    The words come from numpy's SFC64 generator, in fixed chunks each seeded with (seed, chunk index),
    so the mask depends only on the seed, not on how many threads drew it; chunks are drawn and compared
    on a small thread pool (numpy releases the GIL), since drawing is otherwise single-threaded.
    """
    out = torch.empty(n, dtype=torch.bool)
    flat = out.numpy()
    n_words = (n + 1) // 2
    limit = np.int32(threshold)

    def chunk(i: int) -> None:
        lo = i * _RNG_CHUNK
        hi = min(n_words, lo + _RNG_CHUNK)
        words = np.random.SFC64(np.random.SeedSequence([seed, i])).random_raw(hi - lo).view(np.int32)
        first, last = 2 * lo, min(n, 2 * hi)
        np.less(words[: last - first], limit, out=flat[first:last])

    n_chunks = -(-n_words // _RNG_CHUNK)
    workers = max(1, min(torch.get_num_threads(), n_chunks))
    if workers == 1:
        for i in range(n_chunks):
            chunk(i)
    else:
        list(_pool().map(chunk, range(n_chunks)))
    return out


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True where an element is dropped, each independently with probability p.

    32 random bits per element are compared with round(p * 2^32), so the drop probability is p to
    within 2^-32. On a CPU the bits come from numpy's SFC64 generator (about 3x faster than PyTorch's
    Mersenne Twister, and drawn on as many threads as PyTorch uses), seeded with one draw from
    PyTorch's default generator: runs stay reproducible under `torch.manual_seed` and resume exactly
    from a checkpoint's saved RNG state.
    """
    n = math.prod(shape)
    if p >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    threshold = -(2**31) + round(p * 2**32)
    if device.type == "cpu":
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return _cpu_drop_mask(n, threshold, seed).view(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    return (bits.view(torch.int32)[:n] < threshold).view(shape)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p and scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    return x.masked_fill(dropout_mask(x.shape, p, x.device), 0.0).mul_(_keep_scale(p))


def _keep_scale(p: float) -> float:
    """Inverted dropout's scale 1 / (1 - p) (0 when p = 1, where every element is dropped anyway)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _unscaled_dropout(x: torch.Tensor, p: float, training: bool) -> tuple[torch.Tensor, float]:
    """Dropout's zeroing without its 1 / (1 - p) scale, returned separately to be folded into a later op."""
    if not training or p == 0.0:
        return x, 1.0
    return x.masked_fill(dropout_mask(x.shape, p, x.device), 0.0), _keep_scale(p)


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
        drop = dropout_mask(prob.shape, p, prob.device) if p > 0.0 else None
        kept = prob.masked_fill(drop, 0.0) if drop is not None else prob
        out = torch.bmm(kept.view(b * h, lq, lk), vf)
        if drop is not None:
            out.mul_(_keep_scale(p))
        ctx.save_for_backward(qf, kf, vf, prob, drop)
        ctx.p = p
        return out.view(b, h, lq, d)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        qf, kf, vf, prob, drop = ctx.saved_tensors
        p = ctx.p
        b, h, lq, lk = prob.shape
        d = qf.shape[-1]
        g = grad_out.reshape(b * h, lq, d).to(qf.dtype)
        if drop is not None:
            g = g * _keep_scale(p)
            kept = prob.masked_fill(drop, 0.0)
        else:
            kept = prob
        dv = torch.bmm(kept.view(b * h, lq, lk).transpose(1, 2), g) if ctx.needs_input_grad[2] else None
        del kept
        dprob = torch.bmm(g, vf.transpose(1, 2)).view(b, h, lq, lk)
        if drop is not None:
            dprob.masked_fill_(drop, 0.0)
        dscores = torch._softmax_backward_data(dprob, prob, -1, prob.dtype).view(b * h, lq, lk)
        del dprob
        dq = torch.bmm(dscores, kf).view(b, h, lq, d) if ctx.needs_input_grad[0] else None
        dk = torch.bmm(dscores.transpose(1, 2), qf).view(b, h, lk, d) if ctx.needs_input_grad[1] else None
        return dq, dk, None if dv is None else dv.view(b, h, lk, d), None, None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p: float) -> torch.Tensor:
    """Attention [B, H, Lq, D] over [B, H, Lk, D] with an additive bias broadcastable to [B, H, Lq, Lk].

    Without autograd and dropout this is PyTorch's fused CPU attention (no [Lq, Lk] tensor in memory);
    otherwise `_Attention`.
    """
    if p == 0.0 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return _Attention.apply(q, k, v, bias, p)


class _Weights:
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


def _norm_to(layer_norm: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """T5LayerNorm followed by a cast to the compute dtype (the input of the next matmuls)."""
    w = layer_norm.weight
    if x.dtype != torch.float32 or w.dtype != torch.float32 or w.requires_grad:
        return _norm(layer_norm, x).to(dtype)
    return _RMSNormTo.apply(x, w, layer_norm.variance_epsilon, dtype)


def _norm(layer_norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """T5LayerNorm (RMSNorm without mean subtraction), in fp32 like transformers' implementation."""
    w = layer_norm.weight
    out = F.rms_norm(
        x.float() if x.dtype != torch.float32 else x, (x.shape[-1],), w.float(), layer_norm.variance_epsilon
    )
    return out.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) else out


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, L, H * D] -> [B, H, L, D]."""
    b, length, inner = x.shape
    return x.view(b, length, n_heads, inner // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H * D]."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def _self_qkv(attn: nn.Module, x: torch.Tensor, weights: _Weights) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, L, D] of a self-attention.

    (Three GEMMs: fusing them, or all decoder layers' cross-attention k/v, into one GEMM measured no
    faster on a CPU, and the all-layer fusion slower, because of the extra layout copies.)
    """
    return tuple(_heads(F.linear(x, weights(lin)), attn.n_heads) for lin in (attn.q, attn.k, attn.v))


def _cross_kv(
    dec: nn.Module, memory: torch.Tensor, weights: _Weights
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every decoder layer's cross-attention k, v [B, H, L, D], projected from the encoder output."""
    cross = [block.layer[1].EncDecAttention for block in dec.block]
    return [
        (_heads(F.linear(memory, weights(a.k)), a.n_heads), _heads(F.linear(memory, weights(a.v)), a.n_heads))
        for a in cross
    ]


def _ffn(
    ff: nn.Module, x: torch.Tensor, weights: _Weights, act: Callable, training: bool
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
    ff_layer: nn.Module, x: torch.Tensor, weights: _Weights, act: Callable, training: bool
) -> tuple[torch.Tensor, float, bool, float]:
    """`_residual` arguments for a T5LayerFF: (branch, outer dropout p, training, inner dropout scale)."""
    out, scale = _ffn(ff_layer.DenseReluDense, x, weights, act, training)
    return out, ff_layer.dropout.p, training, scale


def _position_bias(
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


def _key_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 padding mask -> additive [B, 1, 1, L] bias (0 or the dtype's most negative value)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask == 0, torch.finfo(dtype).min
    )[:, None, None, :]


def _lean_encode(
    t5: T5ForConditionalGeneration,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    weights: _Weights,
    training: bool,
) -> torch.Tensor:
    """T5Stack (encoder) forward from input embeddings: [B, L, d] -> [B, L, d]."""
    enc = t5.encoder
    act = _ACTIVATIONS[t5.config.dense_act_fn]
    cd = weights.dtype
    length = embeds.shape[1]
    first = enc.block[0].layer[0].SelfAttention
    # Position bias and padding mask, combined once for the whole stack, in the compute dtype.
    bias = _position_bias(first, length, length, embeds.device, cd)
    bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(cd).min)
    h = _dropout(embeds, enc.dropout.p, training)
    for block in enc.block:
        sa, ff = block.layer[0], block.layer[-1]
        attn = sa.SelfAttention
        x = _norm_to(sa.layer_norm, h, cd)
        q, k, v = _self_qkv(attn, x, weights)
        o = _merge(_attend(q, k, v, bias, attn.dropout if training else 0.0))
        h = _residual(h, F.linear(o, weights(attn.o)), sa.dropout.p, training)
        x = _norm_to(ff.layer_norm, h, cd)
        h = _residual(h, *_ffn_args(ff, x, weights, act, training))
    return _dropout(_norm(enc.final_layer_norm, h), enc.dropout.p, training)


def _lean_decode(
    t5: T5ForConditionalGeneration,
    decoder_input_ids: torch.Tensor,
    enc_out: torch.Tensor,
    enc_mask: torch.Tensor,
    weights: _Weights,
    training: bool,
) -> torch.Tensor:
    """Teacher-forced decoder + LM head: [B, T] ids -> logits [B, T, V] in the compute dtype."""
    dec = t5.decoder
    act = _ACTIVATIONS[t5.config.dense_act_fn]
    cd = weights.dtype
    length = decoder_input_ids.shape[1]
    self_bias = _position_bias(
        dec.block[0].layer[0].SelfAttention, length, length, enc_out.device, cd, causal=True
    )
    cross_bias = _key_mask(enc_mask, cd)
    cross_kv = _cross_kv(dec, enc_out.to(cd), weights)
    h = _dropout(dec.embed_tokens(decoder_input_ids), dec.dropout.p, training)
    for block, (k_mem, v_mem) in zip(dec.block, cross_kv, strict=True):
        sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
        attn = sa.SelfAttention
        x = _norm_to(sa.layer_norm, h, cd)
        q, k, v = _self_qkv(attn, x, weights)
        o = _merge(_attend(q, k, v, self_bias, attn.dropout if training else 0.0))
        h = _residual(h, F.linear(o, weights(attn.o)), sa.dropout.p, training)
        cross = ca.EncDecAttention
        x = _norm_to(ca.layer_norm, h, cd)
        q = _heads(F.linear(x, weights(cross.q)), cross.n_heads)
        o = _merge(_attend(q, k_mem, v_mem, cross_bias, cross.dropout if training else 0.0))
        h = _residual(h, F.linear(o, weights(cross.o)), ca.dropout.p, training)
        x = _norm_to(ff.layer_norm, h, cd)
        h = _residual(h, *_ffn_args(ff, x, weights, act, training))
    h = _dropout(_norm(dec.final_layer_norm, h), dec.dropout.p, training)
    if getattr(t5.config, "scale_decoder_outputs", False):
        h = h * (t5.config.d_model**-0.5)
    return F.linear(h.to(cd), weights(t5.lm_head))


def _token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


@torch.no_grad()
def _lean_greedy(
    t5: T5ForConditionalGeneration,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    weights: _Weights,
) -> torch.Tensor:
    """Greedy decoding with a preallocated KV cache, as `generate(do_sample=False, num_beams=1)` does it.

    Each step embeds the last token, runs every decoder layer on that one position (self-attention
    over the cache, cross-attention over keys/values projected once per batch), takes the argmax of
    the logits in fp32, writes `pad` for rows that already emitted EOS, and stops when every row has.
    Attention at query length 1 is two small batched matmuls in fp32 (keys/values are cached in fp32),
    which is both cheaper on a CPU than the fused kernel and at least as precise.

    Returns:
        [B, 1 + steps] ids starting with the decoder start token, like `generate`.
    """
    cfg, gen = t5.config, t5.generation_config
    dec = t5.decoder
    act = _ACTIVATIONS[cfg.dense_act_fn]
    cd = weights.dtype
    device = embeds.device
    batch = embeds.shape[0]
    start = (
        gen.decoder_start_token_id if gen.decoder_start_token_id is not None else cfg.decoder_start_token_id
    )
    eos = torch.tensor(
        _token_ids(gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id), device=device
    )
    pad = gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id
    if pad is None and len(eos):
        pad = int(eos[0])

    memory = _lean_encode(t5, embeds, mask, weights, training=False).to(cd)
    first = dec.block[0].layer[0].SelfAttention
    heads, d_kv = first.n_heads, first.key_value_proj_dim
    rows, length = batch * heads, memory.shape[1]
    # Keys and values as [B * H, L, D] fp32, contiguous, so every step is two plain bmm calls.
    cross_bias = _key_mask(mask, torch.float32).expand(batch, heads, 1, length).reshape(rows, 1, length)
    cross_kv = [
        (k.reshape(rows, length, d_kv).float(), v.reshape(rows, length, d_kv).float())
        for k, v in _cross_kv(dec, memory, weights)
    ]
    del memory
    steps = max_new_tokens
    self_bias = _position_bias(first, steps, steps, device, torch.float32)[0]  # [H, steps, steps]
    cache_k = [torch.zeros(rows, steps, d_kv, device=device) for _ in dec.block]
    cache_v = [torch.zeros(rows, steps, d_kv, device=device) for _ in dec.block]

    tokens = torch.full((batch, 1), start, dtype=torch.long, device=device)
    out = [tokens]
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    scale = cfg.d_model**-0.5 if getattr(cfg, "scale_decoder_outputs", False) else None

    def one_query(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        """[B, 1, d] -> [B * H, 1, D] fp32."""
        return F.linear(x, weights(lin)).float().view(rows, 1, d_kv)

    def merged(o: torch.Tensor) -> torch.Tensor:
        """[B * H, 1, D] -> [B, 1, H * D] in the compute dtype."""
        return o.view(batch, 1, heads * d_kv).to(cd)

    for t in range(steps):
        h = dec.embed_tokens(tokens)  # [B, 1, d]
        bias_t = self_bias[:, t : t + 1, : t + 1]  # [H, 1, t + 1]
        for i, block in enumerate(dec.block):
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
            attn = sa.SelfAttention
            x = _norm_to(sa.layer_norm, h, cd)
            q, k, v = _self_qkv(attn, x, weights)  # [B, H, 1, D] each
            q = q.reshape(rows, 1, d_kv).float()
            cache_k[i][:, t : t + 1] = k.reshape(rows, 1, d_kv)
            cache_v[i][:, t : t + 1] = v.reshape(rows, 1, d_kv)
            scores = (
                torch.bmm(q, cache_k[i][:, : t + 1].transpose(1, 2)).view(batch, heads, 1, t + 1) + bias_t
            )
            o = torch.bmm(torch.softmax(scores, dim=-1).view(rows, 1, t + 1), cache_v[i][:, : t + 1])
            h = h + F.linear(merged(o), weights(attn.o))
            cross = ca.EncDecAttention
            x = _norm_to(ca.layer_norm, h, cd)
            ck, cv = cross_kv[i]
            scores = torch.bmm(one_query(x, cross.q), ck.transpose(1, 2)) + cross_bias
            o = torch.bmm(torch.softmax(scores, dim=-1), cv)
            h = h + F.linear(merged(o), weights(cross.o))
            x = _norm_to(ff.layer_norm, h, cd)
            h = h + _ffn(ff.DenseReluDense, x, weights, act, training=False)[0]
        h = _norm(dec.final_layer_norm, h)
        if scale is not None:
            h = h * scale
        logits = F.linear(h[:, -1].to(cd), weights(t5.lm_head)).float()
        nxt = logits.argmax(dim=-1)
        if pad is not None:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        tokens = nxt[:, None]
        out.append(tokens)
        if len(eos):
            unfinished &= ~torch.isin(nxt, eos)
            if not bool(unfinished.any()):
                break
    return torch.cat(out, dim=1)
