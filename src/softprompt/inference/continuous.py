"""Continuous batching over a prompt bank: prepared rows of any prompts join a running decoder batch
between steps and leave it as soon as their answer ends (iteration-level scheduling, as in Orca).

`ContinuousDecoder` is what `softprompt serve` runs on its model thread (`serving.continuous`): each
call of `advance` drops abandoned rows, runs the encoder once for the rows joining (their prompts in
front, as `PromptBank.answer_prepared` puts them), takes one decoder step for every row
(`modeling.lean_stream.DecodeStream`) and returns the answers of the rows that finished, mapped to the
user's text by their task (`Task.answer_text`). A row's answer is the one `PromptBank.answer_prepared`
(and so `predict`) gives it, whatever joins or leaves around it.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence

import torch

from softprompt.data.batching import Collator
from softprompt.inference.bank import PromptBank
from softprompt.inference.engine import autocast, decode_answers
from softprompt.inference.entries import PreparedRow
from softprompt.modeling.lean_greedy import plain_greedy
from softprompt.modeling.lean_stream import DecodeStream


class ContinuousDecoder:
    """A running batch of prepared rows over a bank's one frozen model.

    Args:
        bank: the model and its prompts.
        max_new_tokens: the longest answer in tokens.
        bf16: run under bf16 autocast, as `PromptBank.answer_prepared(bf16=True)` does.
        slots: rows the decoder's caches are allocated for (the server's `--max_batch_size`).
    """

    def __init__(
        self, bank: PromptBank, *, max_new_tokens: int = 32, bf16: bool = False, slots: int = 32
    ) -> None:
        self.bank = bank
        self.bf16 = bf16
        model = bank.model
        with autocast(bank.device, bf16):
            dtype = model.fast_path_dtype(bank.device, for_training=False)
        # Only where `generate` would decode with the lean loop: elsewhere answers would not be predict's.
        self.supported = dtype is not None and plain_greedy(model.model.generation_config)
        self._stream = DecodeStream(model.model, dtype or torch.float32, max_new_tokens, slots)
        self._rows: dict[Hashable, PreparedRow] = {}
        self._collate = Collator(pad_token_id=bank.tokenizer.pad_token_id)

    @property
    def rows(self) -> int:
        """Rows decoding now."""
        return self._stream.rows

    def tokens_with(self, joining: Sequence[PreparedRow]) -> int:
        """Encoder positions the running batch would hold with `joining` added (rows x padded length): what
        its cross-attention caches take, per layer and head."""
        longest = max([self._stream.encoder_length, *(r.length for r in joining)])
        return (self.rows + len(joining)) * longest

    @torch.no_grad()
    def advance(
        self, joining: Sequence[tuple[Hashable, PreparedRow]] = (), leaving: Collection[Hashable] = ()
    ) -> list[tuple[Hashable, str]]:
        """Drop `leaving`, admit `joining`, run one decoder step; the (key, answer) of every row that ended.

        Args:
            joining: new rows with their keys (keys must be new).
            leaving: keys of rows to drop undecoded (their client left).
        """
        self.drop(leaving)
        if joining:
            self._admit(joining)
        finished = self._stream.step()
        if not finished:
            return []
        texts = decode_answers(self.bank.tokenizer, [f.ids for f in finished])
        out = []
        for f, text in zip(finished, texts, strict=True):
            row = self._rows.pop(f.key)
            out.append((f.key, self.bank.entry(row.task).task.answer_text(row.example, text)))
        return out

    def drop(self, leaving: Collection[Hashable]) -> None:
        """Drop the rows of these keys from the batch undecoded (their client left)."""
        if not leaving:
            return
        self._stream.drop([i for i, key in enumerate(self._stream.keys) if key in leaving])
        for key in leaving:
            self._rows.pop(key, None)

    def _admit(self, joining: Sequence[tuple[Hashable, PreparedRow]]) -> None:
        """Encode the joining rows with their prompts in front and add them to the stream."""
        bank, device = self.bank, self.bank.device
        rows = [r for _, r in joining]
        batch = self._collate([r.features for r in rows])
        prompt, lengths = bank.stack(torch.tensor([r.task for r in rows], dtype=torch.long))
        with autocast(device, self.bf16):
            embeds, mask = bank.model.encoder_inputs(
                batch["input_ids"].to(device), batch["attention_mask"].to(device), prompt, lengths
            )
        keys = [key for key, _ in joining]
        self._stream.admit(embeds, mask, keys)
        self._rows.update(zip(keys, rows, strict=True))

    def clear(self) -> None:
        """Drop every row (after a failure, so the next batch starts clean)."""
        self._stream.drop(list(range(self._stream.rows)))
        self._rows.clear()
