"""How an inference pass runs: batch size, answer length, devices and ranks, precision, progress.

One `GenerationOptions` travels from the callers (`eval`, `predict`, `serve`, the trainer's evaluation, the
demo and the bench) through `softprompt.inference.bank.PromptBank` and `softprompt.inference.scoring` to
the engine (`softprompt.inference.engine.generate_answers`) and rank classification
(`softprompt.inference.rank`), instead of untyped keyword arguments passed along.
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.runtime.distributed import DistEnv

__all__ = ["GenerationOptions"]


@dataclass(frozen=True)
class GenerationOptions:
    """The settings of one inference pass (greedy answers or rank classification).

    Attributes:
        batch_size: rows per batch on this rank (for rank classification: inputs, each scored against
            every label).
        max_new_tokens: the longest answer in tokens (greedy answers only; rank classification scores
            whole labels).
        env: the distributed environment (None: one process on the model's device).
        bf16: run under bf16 autocast.
        lockstep: every rank runs the same number of batches (needed when the model is FSDP-sharded).
        show_progress: draw a progress bar (rank 0 only).
    """

    batch_size: int = 64
    max_new_tokens: int = 32
    env: DistEnv | None = None
    bf16: bool = False
    lockstep: bool = False
    show_progress: bool = False
