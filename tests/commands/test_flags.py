"""One parser design for every subcommand (issue 14): `=` syntax, --config, aliases, suggestions, numbers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from softprompt.cli import COMMANDS, main
from softprompt.commands.flags import (
    ConvertArgs,
    DemoArgs,
    EvalArgs,
    ExportArgs,
    FormatArgs,
    InspectArgs,
    PredictArgs,
    ReportArgs,
    ScoreArgs,
    ServeArgs,
    VerifyArgs,
)
from softprompt.config.fields import field_specs
from softprompt.config.parser import parse
from softprompt.training.config import TrainConfig

ARGS = {
    "train": TrainConfig,
    "eval": EvalArgs,
    "predict": PredictArgs,
    "score": ScoreArgs,
    "serve": ServeArgs,
    "inspect": InspectArgs,
    "report": ReportArgs,
    "demo": DemoArgs,
    "format": FormatArgs,
    "convert": ConvertArgs,
    "verify": VerifyArgs,
    "export": ExportArgs,
}
# What a subcommand needs before any other flag parses.
REQUIRED = {
    "eval": ["--model", "m"],
    "predict": ["--model", "m"],
    "serve": ["--model", "m"],
    "score": ["data.json", "pred.json"],
    "inspect": ["prompt_dir"],
    "report": ["run"],
    "format": ["--output", "x.jsonl", "data.json"],
    "convert": ["model_dir", "out"],
    "verify": ["run"],
    "export": ["prompt_dir", "out"],
}


def _exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _sample(kind: typing.Any) -> str:
    if typing.get_origin(kind) is list:
        return _sample(typing.get_args(kind)[0])
    if typing.get_origin(kind) is typing.Literal:
        return typing.get_args(kind)[-1]
    return {int: "3", float: "0.5", str: "x"}[kind]


def test_every_command_has_a_dataclass_and_every_dataclass_a_command():
    assert set(ARGS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(ARGS))
def test_equals_syntax_works_for_every_flag(command):
    cls = ARGS[command]
    # A config-file-only key (train's prompts: list) has no flag to spell.
    specs = [
        s for s in field_specs(cls).values() if not s.positional and not s.config_only and s.kind is not bool
    ]
    spaced, joined = [], []
    for s in specs:
        spaced += [f"--{s.flag}", _sample(s.kind)]
        joined.append(f"--{s.flag}={_sample(s.kind)}")
    required = REQUIRED.get(command, [])
    # The words that are neither a flag nor a flag's value.
    positional = [
        w
        for i, w in enumerate(required)
        if not w.startswith("--") and (i == 0 or not required[i - 1].startswith("--"))
    ]
    a = parse(cls, [*positional, *spaced], f"softprompt {command}")
    b = parse(cls, [*positional, *joined], f"softprompt {command}")
    assert a == b
    for s in specs:
        value = getattr(b, s.name)
        assert value is not None and value != [], s.name


def test_config_file_then_flags_override_it_with_either_syntax(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text("lr: 1e-3\nmax_steps: 1_000\nreport_to: none\nn_tokens: 20\n")
    for argv in (["--config", str(c)], [f"--config={c}"]):
        cfg = parse(TrainConfig, [*argv, "--lr=0.1", "--output_dir", "o"], "softprompt train")
        assert (cfg.lr, cfg.max_steps, cfg.report_to, cfg.n_tokens, cfg.output_dir) == (
            0.1,
            1000,
            ["none"],
            20,
            "o",
        )
    # Flags before --config override it too: the file only ever supplies defaults.
    cfg = parse(TrainConfig, ["--n_tokens", "7", "--config", str(c)], "softprompt train")
    assert cfg.n_tokens == 7 and cfg.lr == 1e-3
    # --config works for every subcommand, with the subcommand's own keys.
    e = tmp_path / "e.yaml"
    e.write_text("model: some/model\nmax_eval_samples: 1e1\nprompt: [a, b]\n")
    args = parse(EvalArgs, [f"--config={e}", "--eval_batch_size=4"], "softprompt eval")
    assert (args.model_name_or_path, args.max_eval_samples, args.prompt, args.eval_batch_size) == (
        "some/model",
        10,
        ["a", "b"],
        4,
    )


ALIASES = [
    # (command, documented flag, alias, field, value)
    *[(c, "--model", "--model_name_or_path", "model_name_or_path", "m") for c in ("train", "eval", "predict")],
    ("serve", "--model", "--model_name_or_path", "model", "m"),
    ("inspect", "--model", "--model_name_or_path", "model", "m"),
    ("eval", "--output", "--out", "output", "f.json"),
    ("predict", "--output", "--out", "output", "f.jsonl"),
    ("inspect", "--output", "--json", "output", "f.json"),
    ("report", "--output_dir", "--out", "output_dir", "d"),
    ("eval", "--eval_batch_size", "--batch_size", "eval_batch_size", 5),
    ("predict", "--eval_batch_size", "--batch_size", "eval_batch_size", 5),
    ("serve", "--max_batch_size", "--eval_batch_size", "max_batch_size", 5),
    *[(c, "--max_target_length", "--max_new_tokens", "max_target_length", 7) for c in ("train", "eval", "predict", "serve")],
]  # fmt: skip


@pytest.mark.parametrize(("command", "flag", "alias", "name", "value"), ALIASES)
def test_one_spelling_per_concept_with_the_other_as_alias(command, flag, alias, name, value):
    base = [w for w in REQUIRED.get(command, []) if not w.startswith("--") and w != "m"]
    cls = ARGS[command]
    model = ["--model", "m"] if command in ("eval", "predict", "serve") and flag != "--model" else []
    for spelling in (flag, alias):
        for argv in ([spelling, str(value)], [f"{spelling}={value}"]):
            args = parse(cls, [*base, *model, *argv], f"softprompt {command}")
            assert getattr(args, name) == value, (spelling, argv)


MISSPELT = {
    "train": ("--n_tokenz", "--n_tokens"),
    "eval": ("--max_eval_sample", "--max_eval_samples"),
    "predict": ("--input_fille", "--input_file"),
    "score": ("--dataset-file", "--dataset_file"),
    "serve": ("--max_wait", "--max_wait_ms"),
    "inspect": ("--top-kk", "--top_k"),
    "report": ("--output_dri", "--output_dir"),
    "demo": ("--threds", "--threads"),
    "format": ("--punctuaton", "--punctuation"),
    "convert": ("--overwite", "--overwrite"),
    "verify": ("--outptu", "--output"),
    "export": ("--too", "--to"),
}


@pytest.mark.parametrize("command", sorted(MISSPELT))
def test_misspelt_flags_get_a_suggestion_in_every_subcommand(command, capsys):
    wrong, right = MISSPELT[command]
    assert _exit([command, *REQUIRED.get(command, []), wrong, "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"unknown flag {wrong}" in err
    if command != "score":  # score has positionals only: nothing to suggest
        assert f"did you mean {right}" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--model", "m", "--max_eval_samples", "0"], "--max_eval_samples must be >= 1, got 0"),
        (["eval", "--model", "m", "--max_eval_samples=-5"], "--max_eval_samples must be >= 1, got -5"),
        (["eval", "--model", "m", "--eval_batch_size", "0"], "--eval_batch_size must be >= 1, got 0"),
        (["predict", "--model", "m", "--batch_size", "0"], "--eval_batch_size must be >= 1, got 0"),
        (["predict", "--model", "m", "--max_new_tokens", "0"], "--max_target_length must be >= 1, got 0"),
        (["serve", "--model", "m", "--max_batch_size", "0"], "--max_batch_size must be >= 1, got 0"),
        (["serve", "--model", "m", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
        (["inspect", "p", "--top_k", "0"], "--top_k must be >= 1, got 0"),
        (["demo", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["train", "--train_file", "hf:squad", "--eval_batch_size", "0", "--batch_size", "-1"],
         "--batch_size must be >= 1, got -1; --eval_batch_size must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_zero_and_negative_numbers_get_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _exit(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err


def test_predict_refuses_a_question_together_with_an_input_file(capsys):
    argv = ["predict", "--model", "m", "--input_file", "q.jsonl", "--question", "Who?", "--context", "Ann."]
    assert _exit(argv) == 2
    assert "give either --question/--context or --input_file, not both" in capsys.readouterr().err
    assert _exit(["predict", "--model", "m", "--question", "Who?"]) == 2
    assert "--question and --context go together" in capsys.readouterr().err


def test_tilde_expands_in_path_flags_even_after_an_equals_sign(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse(TrainConfig, ["--output_dir=~/runs/a", "--train_file=~/t.json"], "softprompt train")
    assert cfg.output_dir == str(tmp_path / "runs" / "a") and cfg.train_file == str(tmp_path / "t.json")
    args = parse(EvalArgs, ["--model=m", "--output=~/p.json"], "softprompt eval")
    assert args.output == str(tmp_path / "p.json")


def test_help_survives_a_closed_pipe_and_imports_nothing_heavy():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "softprompt", "train", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout.readline()  # `| head -1`: one line, then the reader goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    # `softprompt COMMAND --help` parses before anything heavy is imported, for every command.
    probe = (
        "import contextlib, io, sys\n"
        "from softprompt.cli import COMMANDS, main\n"
        "for c in COMMANDS:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main([c, '--help'])\n"
        "print(sorted({'torch', 'transformers', 'fastapi', 'matplotlib'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("command", sorted(ARGS))
def test_help_lists_every_flag_and_its_alias(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for spec in field_specs(ARGS[command]).values():
        if not spec.positional and not spec.config_only:  # config-file-only keys have no flag
            for name in (spec.flag, *spec.aliases):
                assert f"--{name}" in out, name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--max_eval_samples", "0"], "--model is required; --max_eval_samples must be >= 1, got 0"),
        (["serve"], "--model is required"),
        (["score", "data.json"], "give DATASET_FILE PREDICTION_FILE"),
        (["inspect", "--top_k", "2"], "give PROMPT_DIR"),
    ],
)
def test_missing_required_values_are_one_line_with_the_rest(argv, message, capsys):
    assert _exit(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def _flag_snapshot(cls: type) -> dict[str, dict[str, typing.Any]]:
    # What a user can type and what they get without typing it: flag, aliases, default, type, range.
    specs = field_specs(cls)
    out = {}
    for f in dataclasses.fields(cls):
        s = specs[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        out[f.name] = {
            "flag": s.flag,
            "aliases": list(s.aliases),
            "default": repr(default),
            "kind": repr(s.kind),
            "optional": s.optional,
            "bound": repr(s.bound),
            "path": repr(s.path),
            "positional": s.positional,
        }
    return out


@pytest.mark.parametrize("command", sorted(ARGS))
def test_every_subcommand_keeps_its_flags_and_defaults(command: str) -> None:
    # Recorded from the flags before the shared groups (config.groups) replaced the copied fields.
    snapshot = json.loads((Path(__file__).parent / "flags_snapshot.json").read_text(encoding="utf-8"))
    assert _flag_snapshot(ARGS[command]) == snapshot[command]


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(ARGS))
def test_help_names_each_flag_before_its_aliases_and_each_positional_by_name(command, capsys, monkeypatch):
    # Issue 27 item 12: `--out STR, --output_dir STR` (aliases first) and positionals shown as `STR STR`.
    monkeypatch.setenv("COLUMNS", "160")
    out = _help(command, capsys)
    rows = [line.strip("│ ") for line in out.splitlines() if line.strip("│ ").startswith("--")]
    specs = field_specs(ARGS[command]).values()
    for spec in specs:
        if spec.positional or spec.config_only or not spec.aliases:
            continue
        [row] = [r for r in rows if re.search(rf"(^|, )--{spec.aliases[0]}\b", r)]
        assert row.startswith(f"--{spec.flag} "), row
    usage = out.split("\n\n")[0]
    assert "STR STR" not in usage and "[STR" not in usage and "[[" not in usage, usage
    for spec in specs:
        if spec.positional:
            assert spec.metavar and spec.metavar in usage, (spec.name, usage)


def test_help_never_breaks_a_number_across_lines(capsys, monkeypatch):
    # Issue 27 item 12: "Default: 1,100,000" wrapped as "1," / "100,000" at some widths.
    for width in range(40, 121, 2):
        monkeypatch.setenv("COLUMNS", str(width))
        text = re.sub(r"[│ \t]*\n[│ \t]*", " ", _help("train", capsys))  # the lines joined, boxes dropped
        assert not re.search(r"\d, \d{3}\b", text), width
        assert "Default: 1\u00a0100\u00a0000 for *-lm-adapt models, 1\u00a0000\u00a0000 for" in text, width
