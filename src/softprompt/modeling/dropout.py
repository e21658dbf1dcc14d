"""Dropout masks that a seed fixes: reproducible under `torch.manual_seed`, resumable from a checkpoint.

`dropout_mask` is what softprompt's lean T5 (`softprompt.modeling.lean_t5`) drops with, and what the
tests route transformers' dropout through to compare the two paths draw for draw. On a CPU the bits come
from numpy's SFC64 generator, drawn in fixed seeded chunks on a small thread pool; on CUDA from PyTorch's
generator on the device.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

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


def _cpu_drop_mask(n: int, threshold: int, seed: int, keep: bool = False) -> torch.Tensor:
    """[n] bool, True where a 32-bit random word falls below `threshold` (as a signed int32); with `keep`,
    its complement (True where the word does not), from the same words.

    The words come from numpy's SFC64 generator, in fixed chunks each seeded with (seed, chunk index),
    so the mask depends only on the seed, not on how many threads drew it; chunks are drawn and compared
    on a small thread pool (numpy releases the GIL), since drawing is otherwise single-threaded.
    """
    out = torch.empty(n, dtype=torch.bool)
    flat = out.numpy()
    n_words = (n + 1) // 2
    limit = np.int32(threshold)
    compare = np.greater_equal if keep else np.less

    def chunk(i: int) -> None:
        lo = i * _RNG_CHUNK
        hi = min(n_words, lo + _RNG_CHUNK)
        words = np.random.SFC64(np.random.SeedSequence([seed, i])).random_raw(hi - lo).view(np.int32)
        first, last = 2 * lo, min(n, 2 * hi)
        compare(words[: last - first], limit, out=flat[first:last])

    n_chunks = -(-n_words // _RNG_CHUNK)
    workers = max(1, min(torch.get_num_threads(), n_chunks))
    if workers == 1:
        for i in range(n_chunks):
            chunk(i)
    else:
        list(_pool().map(chunk, range(n_chunks)))
    return out


# numpy draws the bits, which torch.compile cannot trace: one opaque call instead of a graph break whose
# resumed frame dynamo would recompile for every mask size.
@torch.compiler.disable
def _seeded_cpu_mask(shape: tuple[int, ...], threshold: int, keep: bool) -> torch.Tensor:
    """`_cpu_drop_mask` seeded with one draw from PyTorch's default generator, in `shape`."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return _cpu_drop_mask(math.prod(shape), threshold, seed, keep).view(shape)


def dropout_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device, *, keep: bool = False
) -> torch.Tensor:
    """A bool mask, True where an element is dropped, each independently with probability p (with `keep`,
    True where it is kept: the complement of the same draw).

    32 random bits per element are compared with round(p * 2^32), so the drop probability is p to
    within 2^-32. On a CPU the bits come from numpy's SFC64 generator (about 3x faster than PyTorch's
    Mersenne Twister, and drawn on as many threads as PyTorch uses), seeded with one draw from
    PyTorch's default generator: runs stay reproducible under `torch.manual_seed` and resume exactly
    from a checkpoint's saved RNG state.
    """
    n = math.prod(shape)
    if p >= 1.0:
        return torch.full(shape, not keep, dtype=torch.bool, device=device)
    threshold = -(2**31) + round(p * 2**32)
    if device.type == "cpu":
        return _seeded_cpu_mask(tuple(shape), threshold, keep)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    words = bits.view(torch.int32)[:n]
    return (words >= threshold if keep else words < threshold).view(shape)
