"""Realistic answer lengths for bench/bench_serve.py: random weights, EOS forced after a per-question length.

A random-weight T5 never emits EOS, so every answer runs to ``--max-new-tokens`` and continuous batching
has nothing to retire early. Here each question i gets a target length n_i (bench_serve takes the token
count of its first SQuAD dev gold answer, so the lengths follow SQuAD's distribution) and both servers
are steered alike: while fewer than n_i answer tokens exist, EOS's logit is -inf; at n_i every logit but
EOS's is -inf. So a row decodes exactly n_i tokens and then EOS (or stops at the token limit when
n_i >= it), its other tokens unchanged: greedy's argmax over the remaining logits.

* PEFT server (bench/peft_server.py ``--lengths``): `EosAfter`, a transformers `LogitsProcessor` made
  per request from the request's (question, context).
* softprompt serve: ``python bench/answer_lengths.py --lengths F --log L serve ...`` runs the ordinary
  ``softprompt serve`` in this process after `install` wrapped, in memory only, the few functions that see
  a row: `PromptBank.prepare` (tokenised ids -> question), `PromptedT5.encoder_inputs` (a batch's rows
  -> their targets), the greedy loop and `DecodeStream.admit` (targets in their row order) and
  `lean_greedy.step_logits` (the logits step both the static and the continuous path take). Nothing in
  src/ changes; a row with no target (not a bench question) is left alone.

Both servers append ``index<TAB>answer tokens`` for every answered question to their ``--log``, counted
from the ids they generated (tokens before EOS), so bench_serve checks that each server decoded exactly
the target lengths rather than trusting the steering.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

Key = tuple[str, str]


def read_lengths(path: Path) -> tuple[dict[Key, int], dict[Key, int]]:
    """``[{"question", "context", "tokens"}, ...]`` -> ((question, context) -> tokens, -> index).

    A (question, context) pair that occurs twice is one question: its first occurrence gives its
    length and index (bench_serve writes the same length for both).
    """
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    tokens: dict[Key, int] = {}
    index_of: dict[Key, int] = {}
    for i, r in enumerate(rows):
        key = (r["question"], r["context"])
        tokens.setdefault(key, int(r["tokens"]))
        index_of.setdefault(key, i)
    return tokens, index_of


def steer(logits: torch.Tensor, generated: torch.Tensor, targets: torch.Tensor, eos: int) -> torch.Tensor:
    """Logits [B, V] with EOS ruled out before each row's target and forced at it.

    Args:
        logits: next-token scores [B, V].
        generated: [B] answer tokens each row has so far.
        targets: [B] each row's answer length; a negative target leaves the row alone.
    """
    out = logits.clone()
    steered = targets >= 0
    before = steered & (generated < targets)
    at = steered & (generated >= targets)
    out[before, eos] = float("-inf")
    keep = out[at, eos].clone()
    out[at] = float("-inf")
    out[at, eos] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))
    return out


def answer_tokens(ids: Sequence[int], eos: int, start: int = 1) -> int:
    """Tokens generated before EOS (or all of them), counting from position `start` (after the start token)."""
    tail = list(ids[start:])
    return tail.index(eos) if eos in tail else len(tail)


class Log:
    """Appends ``index<TAB>tokens`` lines, thread-safe, flushed at once (the server may be killed)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the server's life
        self._lock = threading.Lock()

    def write(self, index: int, tokens: int) -> None:
        with self._lock:
            self._file.write(f"{index}\t{tokens}\n")
            self._file.flush()


class EosAfter:
    """A transformers logits processor: this request's answer is exactly `tokens` long (then EOS)."""

    def __init__(self, tokens: int, eos: int) -> None:
        self.tokens, self.eos = tokens, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids are the decoder's ids so far, the start token first.
        generated = torch.full((scores.shape[0],), input_ids.shape[1] - 1, device=scores.device)
        targets = torch.full_like(generated, self.tokens)
        return steer(scores, generated, targets, self.eos)


def install(lengths: Path, log: Path) -> None:
    """Wrap softprompt's row-level functions (in memory) so that bench questions end at their lengths."""
    from softprompt.inference.bank import PromptBank
    from softprompt.modeling import lean_greedy, lean_stream
    from softprompt.modeling.model import PromptedT5

    by_key, index_of = read_lengths(lengths)
    out = Log(log)
    by_ids: dict[tuple[int, ...], int] = {}  # tokenised input -> question index
    targets = {i: by_key[k] for k, i in index_of.items()}  # question index -> its length
    state: dict[str, Any] = {"pending": None, "greedy": None, "stream": {}}

    prepare = PromptBank.prepare

    def prepare_wrapped(self: PromptBank, rows: Sequence[Any]) -> Any:
        prepared = prepare(self, rows)
        for row in prepared:
            ex = row.example
            i = index_of.get((getattr(ex, "question", None), getattr(ex, "context", None)))
            if i is not None:
                by_ids[tuple(int(t) for t in row.features.input_ids)] = i
        return prepared

    encoder_inputs = PromptedT5.encoder_inputs

    def encoder_inputs_wrapped(
        self: PromptedT5, input_ids: torch.Tensor, attention_mask: torch.Tensor, *a: Any, **k: Any
    ) -> Any:
        found = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            found.append(by_ids.get(tuple(t for t, m in zip(ids, mask, strict=True) if m), -1))
        state["pending"] = found
        return encoder_inputs(self, input_ids, attention_mask, *a, **k)

    def row_targets(found: list[int]) -> torch.Tensor:
        return torch.tensor([targets[i] if i >= 0 else -1 for i in found])

    greedy = lean_greedy.greedy

    def greedy_wrapped(t5: Any, embeds: torch.Tensor, mask: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        found, state["pending"] = state["pending"] or [-1] * embeds.shape[0], None
        order = torch.argsort(lean_greedy.row_ends(mask), descending=True, stable=True)  # as `_greedy` sorts
        state["greedy"] = row_targets(found)[order.cpu()]
        try:
            ids = greedy(t5, embeds, mask, *a, **k)
        finally:
            state["greedy"] = None
        eos = lean_greedy.special_tokens(t5)[1][0]
        for i, row in zip(found, ids.tolist(), strict=True):
            if i >= 0:
                out.write(i, answer_tokens(row, eos))
        return ids

    admit = lean_stream.DecodeStream.admit

    def admit_wrapped(
        self: Any, embeds: torch.Tensor, mask: torch.Tensor, keys: Sequence[Hashable], *a: Any, **k: Any
    ) -> None:
        found, state["pending"] = state["pending"] or [-1] * len(keys), None
        for key, i in zip(keys, found, strict=True):
            state["stream"][key] = i
        admit(self, embeds, mask, keys, *a, **k)

    step = lean_stream.DecodeStream.step

    def step_wrapped(self: Any) -> Any:
        finished = step(self)
        eos = int(self.eos[0]) if len(self.eos) else -1
        for f in finished:
            i = state["stream"].pop(f.key, -1)
            if i >= 0:
                out.write(i, answer_tokens(f.ids, eos))
        return finished

    step_logits: Callable[..., torch.Tensor] = lean_greedy.step_logits

    def step_logits_wrapped(
        t5: Any, tokens: torch.Tensor, t: int, self_attn: Any, *a: Any, **k: Any
    ) -> torch.Tensor:
        logits = step_logits(t5, tokens, t, self_attn, *a, **k)
        eos = lean_greedy.special_tokens(t5)[1][0]
        owner = getattr(self_attn, "owner", None)
        if owner is not None:  # DecodeStream: each row at its own position
            want = row_targets([state["stream"].get(key, -1) for key in owner.keys])
            return steer(logits, owner.pos.cpu(), want, eos)
        if state["greedy"] is not None:  # lean_greedy: every row at step t
            return steer(logits, torch.full((logits.shape[0],), t), state["greedy"], eos)
        return logits

    PromptBank.prepare = prepare_wrapped  # type: ignore[method-assign]
    PromptedT5.encoder_inputs = encoder_inputs_wrapped  # type: ignore[method-assign]
    lean_greedy.greedy = greedy_wrapped
    lean_stream.DecodeStream.admit = admit_wrapped  # type: ignore[method-assign]
    lean_stream.DecodeStream.step = step_wrapped  # type: ignore[method-assign]
    lean_greedy.step_logits = step_logits_wrapped
    lean_stream.step_logits = step_logits_wrapped  # lean_stream imported the name itself


def main() -> int:
    p = argparse.ArgumentParser(description="softprompt serve with bench answer lengths (see the docstring)")
    p.add_argument("--lengths", type=Path, required=True, help="JSON written by bench_serve.py")
    p.add_argument("--log", type=Path, required=True, help="index<TAB>tokens per answered question")
    args, rest = p.parse_known_args()
    install(args.lengths, args.log)
    from softprompt.cli import main as softprompt_main

    return softprompt_main(rest)


if __name__ == "__main__":
    sys.exit(main())
