"""`--precision auto`: bf16 where the CPU (or GPU) computes it natively, fp32 elsewhere, and why."""

from __future__ import annotations

import dataclasses

import pytest

from softprompt.runtime import precision as prec


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given /proc/cpuinfo flags (and no override)."""

    def set_flags(*flags: str) -> None:
        monkeypatch.delenv(prec.NATIVE_BF16_ENV, raising=False)
        monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset(flags))

    prec._warned.clear()
    yield set_flags
    prec._warned.clear()


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        (("avx2", "fma"), False),  # an AVX2 desktop or an AMD EPYC Zen 3: bf16 emulated
        (("avx2", "avx512f", "avx512bw"), False),  # AVX-512 without its BF16 extension (Skylake-SP)
        (("avx2", "avx512f", "avx512_bf16"), True),  # Cooper Lake, Zen 4
        (("avx2", "amx_tile", "amx_bf16"), True),  # Sapphire Rapids
        (("fp", "asimd", "bf16"), True),  # an Arm CPU with the BF16 extension (Graviton 3)
        ((), False),  # no /proc/cpuinfo: claim nothing
    ],
)
def test_auto_follows_the_cpu_flags(cpu, flags, native):
    cpu(*flags)
    choice = prec.resolve_precision("auto", "cpu")
    assert prec.native_bf16("cpu") is native
    assert choice.name == ("bf16" if native else "fp32")
    assert choice.reason.startswith("auto: this CPU ")
    assert ("natively" in choice.reason) is native
    assert not choice.slow


def test_the_reason_names_the_flag(cpu):
    cpu("avx2", "amx_bf16", "avx512_bf16")
    assert prec.resolve_precision("auto").describe() == (
        "precision bf16 (auto: this CPU computes bf16 natively (avx512_bf16, amx_bf16))"
    )


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once(cpu, capsys):
    cpu("avx2")
    choice = prec.resolve_precision("bf16")
    assert (choice.name, choice.slow) == ("bf16", True)
    prec.warn_if_slow(choice)
    prec.warn_if_slow(choice)
    err = capsys.readouterr().err
    assert err.count("softprompt: warning: --precision bf16") == 1
    assert "emulated" in err


def test_explicit_choices_are_kept_and_quiet(cpu, capsys):
    cpu("avx512_bf16")
    for name in ("bf16", "fp32"):
        choice = prec.resolve_precision(name)
        assert (choice.name, choice.reason, choice.slow) == (name, "as asked", False)
        prec.warn_if_slow(choice)
    cpu("avx2")
    assert not prec.resolve_precision("fp32").slow
    assert capsys.readouterr().err == ""


def test_the_environment_overrides_the_detection(monkeypatch):
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setenv(prec.NATIVE_BF16_ENV, "0")
    assert prec.resolve_precision("auto").name == "fp32"
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setenv(prec.NATIVE_BF16_ENV, "1")
    assert prec.resolve_precision("auto").name == "bf16"
    monkeypatch.setenv(prec.NATIVE_BF16_ENV, "")  # empty: the flags decide
    assert prec.resolve_precision("auto").name == "fp32"


def test_cpu_flags_reads_this_machine():
    # Whatever this machine is, an x86 or Arm Linux reports its flags; the bench prints them.
    flags = prec.cpu_flags()
    if flags:
        assert any(f in flags for f in ("sse2", "avx2", "fp", "asimd"))


def test_with_precision_resolves_a_command_s_flags_and_announce_says_why(cpu, capsys):
    @dataclasses.dataclass
    class Flags:
        precision: str = "auto"
        other: int = 3

    cpu("avx2")
    out, choice = prec.with_precision(Flags(), "cpu")
    assert out == Flags(precision="fp32", other=3) and choice.name == "fp32"
    assert capsys.readouterr().err == ""  # resolving is silent: a refusal after it stays one line
    prec.announce(choice)
    assert capsys.readouterr().err == (
        "softprompt: precision fp32 (auto: this CPU emulates bf16, so fp32 is faster; --precision bf16 forces it)\n"
    )
    cpu("amx_bf16")
    assert prec.with_precision(Flags(), "cpu")[0].precision == "bf16"
    out, choice = prec.with_precision(Flags(precision="fp32"), "cpu")
    assert (out.precision, choice.reason) == ("fp32", "as asked")
