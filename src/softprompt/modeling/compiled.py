"""The lean T5's training forward under `torch.compile`: CUDA graphs per shape on a GPU (`--compile`).

On a GPU the lean step is launch-bound: at t5-base, batch 32, it is a few milliseconds of matrix work
spread over thousands of small kernels (docs/performance.md, "On an H200"). Compiling it fuses the
elementwise work between the matmuls, and on CUDA `mode="reduce-overhead"` replays each shape's
forward and backward as one CUDA graph. Shapes stay few because training batches are length-bucketed
and, under `--compile` on CUDA, padded to `SOURCE_MULTIPLE` / `TARGET_MULTIPLE` positions
(`training.setup`); dynamo compiles the first shape statically and the rest once with dynamic sizes,
and CUDA graphs are recorded per shape.

The compiled function computes what `lean_t5.logits` computes: the same kernels' math (fused), the same
dropout masks (inductor calls PyTorch's random ops instead of drawing its own, see `compile_logits`),
so a compiled run matches an eager one to rounding and resumes like one (tests/modeling/test_compiled.py;
tests/modeling/test_cuda.py on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._dynamo.config
import torch._inductor.config

from softprompt.modeling import lean_t5

SOURCE_MULTIPLE = 64
"""Encoder lengths are padded to a multiple of this under --compile on CUDA: one CUDA graph per bucket."""
TARGET_MULTIPLE = 8
"""Decoder lengths likewise (answers are short: a coarser step would mostly add decoder work)."""

# The first shape compiles statically, the second recompiles with dynamic sizes; the dropout masks' CPU
# draw is one opaque call per mask (modeling.dropout), so a few more frames compile per distinct mode.
_RECOMPILE_LIMIT = 32


def compile_logits(device_type: str) -> Callable[..., torch.Tensor]:
    """`lean_t5.logits` under `torch.compile`, for the training forward of a frozen T5.

    Inductor's own RNG would draw other dropout masks than eager PyTorch (and than a run resumed
    without --compile); `fallback_random` makes it call PyTorch's random ops, so the masks, and with
    them the losses, are the eager run's. This is a process-wide inductor setting: it is set here,
    where softprompt starts compiling, and never unset.

    Args:
        device_type: where the model runs; "cuda" adds CUDA graphs (`mode="reduce-overhead"`).

    Returns:
        A function with `lean_t5.logits`'s signature and result.
    """
    torch._inductor.config.fallback_random = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(lean_t5.logits, mode=mode)


def mark_step(device_type: str) -> None:
    """Tell CUDA graphs a new forward begins, so the last step's outputs may be overwritten (no-op on CPU)."""
    if device_type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
