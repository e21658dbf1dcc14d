"""T5 with an optional soft prompt prepended to the encoder input.

Prompt mode freezes every weight of the model and trains only the prompt; fine-tune mode trains
all weights and uses no prompt.

Speed (see docs/performance.md): when every model weight is frozen (prompt tuning, inference) and the
model runs on a CPU or a CUDA GPU (`lean_t5.DEVICE_TYPES`), `PromptedT5.forward`, `.generate`, `.encode` and
`.label_logits` run softprompt's lean T5 (`softprompt.modeling.lean_t5.logits`, `.encode`, `.decode`, `softprompt.modeling.lean_greedy.greedy`)
instead of transformers' modules: the same weights, the same function (tests check it against transformers
token for token and loss for loss), fewer and larger kernels. `PromptedT5(..., fast_path=False)`
(`softprompt train --no_fast_path`) switches it off; anything it does not cover (fine-tuning, FSDP,
a whole-model torch.compile, generation configs with logits processors, unknown activations, transformers
versions it was not checked against) goes through transformers as before. `compile_training_forward`
(`--compile`) compiles the lean training forward itself (`softprompt.modeling.compiled`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import textwrap
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from softprompt.errors import CheckpointError
from softprompt.io.checkpoint import refuse_non_t5
from softprompt.io.pretrained import is_hub_id, load_pretrained_t5, model_file, resolve_model_files
from softprompt.modeling import compiled, lean_greedy, lean_t5
from softprompt.modeling.prompt import SoftPrompt
from softprompt.modeling.prompt_table import PromptTable, select_prompts

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
    `torch.load(weights_only=True)`, saying so in one line on stderr (once per process); other pickles are
    refused.
    The Hub's safetensors conversion is never triggered (see softprompt.io.pretrained).

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
    refuse_non_t5(getattr(config, "model_type", None), f"the config.json of {name_or_path}")
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
        fast_path: use softprompt's lean T5 (`softprompt.modeling.lean_t5`) for frozen forward passes and greedy
            decoding on a CPU or CUDA GPU; False runs transformers' modules (the same results, slower).
            Ignored where `lean_t5.supported` says no (under an unchecked transformers version it also
            prints one warning line).
    """

    def __init__(
        self, model: T5ForConditionalGeneration, prompt: SoftPrompt | None = None, *, fast_path: bool = True
    ) -> None:
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
        self.fast_path = fast_path
        self.compiled_logits: Callable[..., torch.Tensor] | None = None

    def with_prompt(self, prompt: SoftPrompt) -> PromptedT5:
        """The same frozen model driven by `prompt`: shares this model's weights and carries its frozen-weight
        state (`frozen_dtype`, `fast_path`), so a run training several prompts on one model can evaluate
        and save each as a single-prompt model without a second copy of anything.
        """
        view = type(self)(self.model, prompt, fast_path=self._fast_path)
        view.frozen_dtype = self.frozen_dtype
        view.compiled_logits = self.compiled_logits
        return view.train(self.training)

    @property
    def prompt_tuning(self) -> bool:
        return self.prompt is not None

    @property
    def fast_path(self) -> bool:
        """Whether the lean T5 may run this model: asked for and supported (see `fast_path_dtype` for when it does)."""
        return self._fast_path

    @fast_path.setter
    def fast_path(self, on: bool) -> None:
        self._fast_path = bool(on) and lean_t5.supported(self.model)

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
            # from_pretrained leaves the weights in a memory map of the safetensors file; a single
            # tensor still pointing into it (the embedding, a norm) would keep every page the casts
            # just read resident: the fp32 weights next to their copies (167 MiB more for t5-small).
            for param in t5.parameters():
                if param.dtype != dtype:
                    param.data = param.data.clone()
        self.frozen_dtype = dtype
        return self

    def compile_training_forward(self, device: torch.device) -> bool:
        """Run the loss's forward and backward under `torch.compile` (`modeling.compiled`) from now on.

        Only the lean path is compiled, so this applies where `fast_path_dtype(device)` says it runs;
        evaluation (no gradient) and decoding stay eager.

        Args:
            device: where training runs ("cuda" adds CUDA graphs).

        Returns:
            False where the lean path does not train this model (fine-tuning, FSDP, `fast_path` off):
            the caller compiles the whole model instead.
        """
        if self.fast_path_dtype(device) is None:
            return False
        self.compiled_logits = compiled.compile_logits(device.type)
        return True

    def fast_path_dtype(self, device: torch.device, *, for_training: bool = True) -> torch.dtype | None:
        """The compute dtype of the lean T5 for a call on `device`, or None when it goes through transformers.

        The lean path runs where `fast_path` is on, on `lean_t5.DEVICE_TYPES`, for unsharded models not being
        compiled, and (for `forward`) only when no model weight trains; `generate` never trains anything,
        so it takes the lean path in fine-tune mode too.

        Args:
            device: where the call runs.
            for_training: for `forward` (True) or for `generate` (False).

        Returns:
            The matmul dtype (the frozen dtype, else the autocast dtype, else the weights'), or None.
        """
        if not self.fast_path or device.type not in lean_t5.DEVICE_TYPES or hasattr(self, "unshard"):
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
        prompt: PromptTable | torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        *,
        prompt_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the input and put the prompt in front of it.

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            prompt: per-row prompts to use instead of this model's own (a mixed-task batch): [B, P, H]; or,
                with `prompt_rows`, a `PromptTable` or a [K, P, H] tensor (see `select_prompts`).
            prompt_lengths: real lengths of `prompt` rows, when they differ ([B]; [K] with `prompt_rows`).
            prompt_rows: [B] each row's index into `prompt`.

        Returns:
            inputs_embeds: [B, P + S, H] and attention_mask: [B, P + S] (P = 0 without a prompt).
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        if prompt is not None:
            prompt, prompt_lengths = select_prompts(prompt, prompt_rows, prompt_lengths)
        elif self.prompt is not None:
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
        *,
        prompt: PromptTable | torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        prompt_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced cross-entropy of the labels.

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            labels: [B, T], -100 where padded.
            reduction: `mean` over target tokens, or `sum` (the trainer sums and divides by the
                global batch's token count so accumulation does not change the gradient); `none` gives
                the [B * T] token losses.
            prompt: per-row prompts instead of this model's own (see `encoder_inputs`): [B, P, H], or a
                `PromptTable` / [K, P, H] tensor with `prompt_rows`. Gradients reach the selected prompts.
            prompt_lengths: real prompt lengths ([B]; [K] with `prompt_rows`), when they differ.
            prompt_rows: [B] each row's index into `prompt`.

        Returns:
            loss: a scalar (or [B * T] for `none`).
        """
        inputs_embeds, mask = self.encoder_inputs(
            input_ids, attention_mask, prompt, prompt_lengths, prompt_rows=prompt_rows
        )
        decoder_input_ids = self.model._shift_right(labels)
        cd = self.fast_path_dtype(inputs_embeds.device)
        if cd is not None:
            teacher_forced = lean_t5.logits
            if self.compiled_logits is not None and torch.is_grad_enabled():
                compiled.mark_step(inputs_embeds.device.type)
                teacher_forced = self.compiled_logits
            logits = teacher_forced(
                self.model, inputs_embeds, mask, decoder_input_ids, cd, training=self.training
            )
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
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt: PromptTable | torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        *,
        prompt_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder once, for decoding against it several times (`label_logits`); for inference, in eval
        mode (the lean path never applies dropout, transformers' modules do in train mode).

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            prompt: optional per-row prompts [B, P, H], or a table with `prompt_rows` (see `encoder_inputs`).
            prompt_lengths: optional real prompt lengths.
            prompt_rows: optional [B] row indices into `prompt`.

        Returns:
            encoder states: [B, P + S, H] and their attention mask: [B, P + S].
        """
        inputs_embeds, mask = self.encoder_inputs(
            input_ids, attention_mask, prompt, prompt_lengths, prompt_rows=prompt_rows
        )
        cd = self.fast_path_dtype(inputs_embeds.device, for_training=False)
        if cd is not None:
            return lean_t5.encode(self.model, inputs_embeds, mask, cd), mask
        with self._autocast(inputs_embeds.device):
            states = self.model.get_encoder()(
                inputs_embeds=inputs_embeds, attention_mask=mask
            ).last_hidden_state
        return states, mask

    @torch.no_grad()
    def label_logits(
        self, encoder_states: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits of `labels` over `encode`'s output: `forward`'s logits without running the
        encoder again. For inference, in eval mode, like `encode`.

        Args:
            encoder_states: [B, L, H] from `encode` (rows may repeat, one copy per candidate target).
            attention_mask: [B, L] the mask `encode` returned, rows repeated likewise.
            labels: [B, T], -100 where padded; the decoder reads them shifted right, as in `forward`.

        Returns:
            logits: [B, T, V] (the compute dtype: bf16 under bf16 autocast or `freeze_to(bf16)`).
        """
        decoder_input_ids = self.model._shift_right(labels)
        cd = self.fast_path_dtype(encoder_states.device, for_training=False)
        if cd is not None:
            return lean_t5.decode(self.model, decoder_input_ids, encoder_states, attention_mask, cd)
        with self._autocast(encoder_states.device):
            return self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                use_cache=False,
            ).logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 32,
        prompt: PromptTable | torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        synced_gpus: bool = False,
        *,
        prompt_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding, stopping when every row has produced EOS.

        Args:
            input_ids: [B, S].
            attention_mask: [B, S].
            max_new_tokens: the longest answer, in tokens.
            prompt: optional per-row prompts [B, P, H], or a table with `prompt_rows` (see `encoder_inputs`).
            prompt_lengths: optional real prompt lengths.
            synced_gpus: keep decoding until every rank is done (an FSDP-sharded model runs
                collectives in each forward, so ranks must take the same number of steps).
            prompt_rows: optional [B] row indices into `prompt`.

        Returns:
            token ids: [B, <= max_new_tokens + 1], starting with the decoder start token.
        """
        inputs_embeds, mask = self.encoder_inputs(
            input_ids, attention_mask, prompt, prompt_lengths, prompt_rows=prompt_rows
        )
        cd = None if synced_gpus else self.fast_path_dtype(inputs_embeds.device, for_training=False)
        if cd is not None and lean_greedy.plain_greedy(self.model.generation_config):
            return lean_greedy.greedy(self.model, inputs_embeds, mask, max_new_tokens, cd)
        with self._autocast(inputs_embeds.device):
            return self.model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                synced_gpus=synced_gpus,
            )
