"""Which numeric precision a command runs in: `--precision auto` picks bf16 where the hardware computes it.

bf16 halves the bytes every frozen weight and activation moves, and on hardware with bf16 matmul units
(a CUDA GPU; an x86 CPU with AVX512-BF16 or AMX; an Arm CPU with the BF16 extension) it also runs the
matmuls at up to twice fp32's rate. Without those units PyTorch emulates bf16 by converting to fp32 and
back around every kernel, which is slower than fp32 itself (on an AVX2 CPU, bf16 training runs at well
under half fp32's speed; docs/performance.md). So `auto` is bf16 where it is native and fp32 elsewhere,
and an explicit `--precision bf16` on emulating hardware runs as asked, with one warning.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

# CPU flags (as /proc/cpuinfo spells them) that give a CPU bf16 matmul instructions.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# Set to 1 or 0 to say whether the CPU's bf16 is native, over what /proc/cpuinfo says.
NATIVE_BF16_ENV = "SOFTPROMPT_NATIVE_BF16"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a command runs in, and why.

    Attributes:
        name: "bf16" or "fp32".
        reason: half a sentence for the start line, e.g. "auto: this CPU computes bf16 natively (amx_bf16)".
        slow: True for bf16 on hardware that only emulates it.
    """

    name: str
    reason: str
    slow: bool = False

    @property
    def bf16(self) -> bool:
        """Whether the forward pass runs under bf16."""
        return self.name == "bf16"

    def describe(self) -> str:
        """The start line's clause, e.g. "precision fp32 (auto: this CPU emulates bf16, fp32 is faster)"."""
        return f"precision {self.name} ({self.reason})"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16_flags() -> list[str]:
    """The flags that make this CPU's bf16 native (empty: bf16 would be emulated, or the CPU is unknown)."""
    # A VM may hide the flags, and tests pin the choice: SOFTPROMPT_NATIVE_BF16=1/0 overrides the detection.
    override = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return [f"{NATIVE_BF16_ENV}=1"] if override == "1" else []
    # Where /proc/cpuinfo is missing (macOS, Windows) nothing is claimed, and auto picks fp32.
    return [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes bf16 matmuls natively (a CUDA GPU that supports bf16, or such a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(native_bf16_flags())


def resolve_precision(requested: str, device: str | torch.device = "cpu") -> PrecisionChoice:
    """Turn `--precision auto|bf16|fp32` into the precision to run in on `device`, with the reason.

    Args:
        requested: the flag's value.
        device: where the model runs.

    Returns:
        auto: bf16 where `native_bf16(device)`, fp32 elsewhere. bf16 and fp32: themselves; bf16 on a
        device that emulates it is marked `slow` (`warn_if_slow` says so once).
    """
    device = torch.device(device)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    native = native_bf16(device)
    if requested == "auto":
        if native:
            why = (
                ", ".join(native_bf16_flags()) if device.type == "cpu" else torch.cuda.get_device_name(device)
            )
            return PrecisionChoice("bf16", f"auto: {where} computes bf16 natively ({why})")
        return PrecisionChoice(
            "fp32", f"auto: {where} emulates bf16, so fp32 is faster; --precision bf16 forces it"
        )
    if requested == "bf16" and not native:
        return PrecisionChoice("bf16", f"as asked; {where} emulates bf16, which is slow here", slow=True)
    return PrecisionChoice(requested, "as asked")


_warned: set[str] = set()


def warn_if_slow(choice: PrecisionChoice) -> None:
    """Say once per process that bf16 runs emulated here (an explicit `--precision bf16` still runs)."""
    if choice.slow and choice.name not in _warned:
        _warned.add(choice.name)
        print(
            "softprompt: warning: --precision bf16 on a CPU without AVX512-BF16, AMX or Arm BF16: bf16 is "
            "emulated and runs slower than fp32 here; --precision auto (or fp32) is faster",
            file=sys.stderr,
            flush=True,
        )


FlagsT = TypeVar("FlagsT")


def with_precision(flags: FlagsT, device: str | torch.device) -> tuple[FlagsT, PrecisionChoice]:
    """`flags` (any dataclass with a `precision` field) with `--precision auto` resolved for `device`.

    Resolved before anything else reads the flags, said (`announce`) once the input and the model have
    loaded, so that a refusal stays one line.

    Args:
        flags: a command's parsed flags.
        device: where the model will run.

    Returns:
        A copy whose `precision` is "bf16" or "fp32", and the choice with its reason.
    """
    choice = resolve_precision(flags.precision, device)  # type: ignore[attr-defined]
    return dataclasses.replace(flags, precision=choice.name), choice  # type: ignore[type-var]


def announce(choice: PrecisionChoice) -> None:
    """Say the choice and its reason on stderr, and warn once if bf16 is emulated here."""
    print(f"softprompt: {choice.describe()}", file=sys.stderr, flush=True)
    warn_if_slow(choice)
