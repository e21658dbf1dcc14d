"""Config files, flags and validation: every preset parses, and every problem is reported at once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from softprompt.errors import ConfigError
from softprompt.training.config import (
    RESUMABLE,
    TrainConfig,
    check_config,
    load_yaml_config,
    resolve_batch,
    resume_changes,
    validate,
    with_mode_defaults,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_is_a_preset_for_every_seed_run():
    names = {p.stem for p in CONFIGS}
    for expected in (
        "prompt_base_adafactor_lr0.3",
        "prompt_base_adafactor_lr1e-3",
        "prompt_base_adamw_lr1e-3",
        "finetune_v1_1_base_lr1e-3",
        "finetune_v1_1_base_lr5e-5",
        "finetune_lm_adapt_base_lr1e-3",
        "prompt_large_adafactor_lr0.3",
        "prompt_xxl_fsdp_8gpu",
        "finetune_v1_1_xxl_fsdp_8gpu",
    ):
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_parses_and_states_its_launch_command(path):
    cfg = load_yaml_config(path)
    assert isinstance(cfg, TrainConfig)
    header = path.read_text().split("\n")
    assert any(
        "softprompt train" in line or "dist_train.sh" in line for line in header if line.startswith("#")
    )
    if "prompt" in path.stem and "finetune" not in path.stem:
        assert cfg.prompt_tuning and cfg.n_tokens == 100 and cfg.prompt_init == "sampled_vocab"
    # the seed's runs report F1/EM in the header, except the XXL presets which quote the paper
    assert any("F1" in line for line in header if line.startswith("#"))


def test_paper_defaults():
    # The lr default depends on the mode (issue 14): the paper's 0.3 for a prompt, 5e-5 for all weights.
    cfg = with_mode_defaults(TrainConfig(prompt_tuning=True))
    assert with_mode_defaults(TrainConfig()).lr == 5e-5
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.n_tokens, cfg.prompt_init) == (
        "adafactor",
        0.3,
        1e-5,
        100,
        "sampled_vocab",
    )
    plan, problems = resolve_batch(cfg, world_size=1)
    assert not problems and plan.global_batch == 32


def test_unknown_keys_and_wrong_types_are_all_listed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: fast\nn_tokenz: 5\nprompt_tuning: 1\noptimizer: sgd\n")
    with pytest.raises(ConfigError) as e:
        load_yaml_config(p)
    msg = str(e.value)
    for part in (
        "'lr' must be a number",
        "unknown key 'n_tokenz'",
        "'prompt_tuning' must be true or false",
        "'optimizer' must be one of",
    ):
        assert part in msg
    assert "\n" not in msg


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.3\n  bad: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml is not valid YAML at line"):
        load_yaml_config(p)


@pytest.mark.parametrize(
    ("g", "b", "a", "w", "expected"),
    [
        (None, None, None, 1, (32, 32, 1)),
        (None, None, None, 4, (32, 8, 1)),
        (None, 2, 2, 1, (4, 2, 2)),
        (None, 2, 1, 2, (4, 2, 1)),
        (32, 4, None, 2, (32, 4, 4)),
        (32, None, 4, 1, (32, 8, 4)),
    ],
)
def test_batch_resolution(g, b, a, w, expected):
    plan, problems = resolve_batch(TrainConfig(global_batch_size=g, batch_size=b, grad_accum_steps=a), w)
    assert not problems
    assert (plan.global_batch, plan.per_device, plan.grad_accum) == expected


def test_impossible_combinations_are_refused_together(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 0.3\n")
    cfg = TrainConfig(
        output_dir=str(out),
        train_file=str(tmp_path / "missing.json"),
        prompt_tuning=False,
        prompt_init_file=str(tmp_path),
        global_batch_size=30,
        batch_size=4,
        lr=-1.0,
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1)
    msg = str(e.value)
    for part in (
        "missing.json does not exist",
        "need --prompt_tuning",
        "--lr must be > 0",
        "global_batch_size 30 is not divisible by batch_size 4",
        "already holds a run; pass --resume",
    ):
        assert part in msg, part


def test_old_pad_punctuation_key_reads_as_a_named_format(tmp_path) -> None:
    """config.yaml and prompt_config.json written before the named formats still load."""
    import json

    from softprompt.io.checkpoint import PROMPT_CONFIG, load_prompt_config

    for old, new in ((True, "paper"), (False, "none")):
        path = tmp_path / f"old_{old}.yaml"
        path.write_text(f"pad_punctuation: {str(old).lower()}\n")
        assert load_yaml_config(path).punctuation == new
        prompt_dir = tmp_path / f"prompt_{old}"
        prompt_dir.mkdir()
        (prompt_dir / PROMPT_CONFIG).write_text(
            json.dumps({"base_model": "m", "n_tokens": 2, "d_model": 4, "pad_punctuation": old})
        )
        assert load_prompt_config(prompt_dir).punctuation == new
    # An explicit new key wins over the old one.
    path = tmp_path / "both.yaml"
    path.write_text("pad_punctuation: true\npunctuation: current\n")
    assert load_yaml_config(path).punctuation == "current"
    assert TrainConfig().punctuation == "paper"


# --------------------------------------------------------------------------- issue 14: files as users write them


def test_yaml_numbers_in_every_notation_users_write(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "lr: 1e-3\nweight_decay: 3e-1\nmax_steps: 1_000\ndropout: .5\nepochs: 1E2\n"
        "warmup_steps: 1e2\nglobal_batch_size: 32.0\nreport_to: none\n"
    )
    cfg = load_yaml_config(p)
    assert (cfg.lr, cfg.weight_decay, cfg.max_steps, cfg.dropout, cfg.epochs) == (1e-3, 0.3, 1000, 0.5, 100.0)
    assert (cfg.warmup_steps, cfg.global_batch_size) == (100, 32)
    assert isinstance(cfg.max_steps, int) and isinstance(cfg.lr, float)
    assert cfg.report_to == ["none"]
    # JSON is YAML too.
    j = tmp_path / "c.json"
    j.write_text('{"lr": 1e-3, "report_to": ["wandb", "tensorboard"], "n_tokens": 20}')
    cfg = load_yaml_config(j)
    assert (cfg.lr, cfg.report_to, cfg.n_tokens) == (1e-3, ["wandb", "tensorboard"], 20)
    # What is no number stays refused, and a fraction is no integer.
    p.write_text("lr: 1e-3x\nmax_steps: 2.5\n")
    with pytest.raises(ConfigError) as e:
        load_yaml_config(p)
    assert "'lr' must be a number, got '1e-3x'" in str(e.value)
    assert "'max_steps' must be an integer, got 2.5" in str(e.value)


def test_unknown_key_names_the_closest_valid_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("n_tokenz: 5\nlearnin_rate: 3\nmodel: x\n")
    with pytest.raises(ConfigError) as e:
        load_yaml_config(p)
    msg = str(e.value)
    assert "unknown key 'n_tokenz' (did you mean 'n_tokens'" in msg
    assert "unknown key 'learnin_rate'" in msg and "\n" not in msg
    assert "'model'" not in msg  # a flag spelling is a valid key: `model` fills model_name_or_path


def test_paths_in_a_config_file_resolve_from_its_folder_and_tilde_expands(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    folder = tmp_path / "configs" / "exp"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text("{}")
    (tmp_path / "configs" / "local-model").mkdir()
    p = folder / "c.yaml"
    p.write_text(
        "train_file: train.json\nvalidation_file: ~/data/dev.json\noutput_dir: ../runs/a\n"
        "prompt_init_file: /abs/prompt\nmodel: ../local-model\ndataset_name: null\n"
    )
    cfg = load_yaml_config(p)
    assert cfg.train_file == str(folder / "train.json")
    assert cfg.validation_file == str(home / "data" / "dev.json")
    assert cfg.output_dir == str(tmp_path / "configs" / "runs" / "a")
    assert cfg.prompt_init_file == "/abs/prompt"
    assert cfg.model_name_or_path == str(tmp_path / "configs" / "local-model")
    # A Hub id is no path, and hf:NAME is no file.
    p.write_text("model_name_or_path: google/t5-base-lm-adapt\ntrain_file: hf:squad\n")
    cfg = load_yaml_config(p)
    assert (cfg.model_name_or_path, cfg.train_file) == ("google/t5-base-lm-adapt", "hf:squad")


def test_hf_data_is_accepted_as_a_train_file(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), train_file="hf:squad", validation_file="hf:squad")
    _, problems = check_config(cfg)
    assert problems == []
    _, problems = check_config(
        TrainConfig(output_dir=str(tmp_path / "run"), train_file=str(tmp_path / "x.json"))
    )
    assert problems == [f"--train_file {tmp_path / 'x.json'} does not exist"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_eval_samples", 0, "--max_eval_samples must be >= 1, got 0"),
        ("max_eval_samples", -5, "--max_eval_samples must be >= 1, got -5"),
        ("eval_batch_size", 0, "--eval_batch_size must be >= 1, got 0"),
        ("batch_size", 0, "--batch_size must be >= 1, got 0"),
        ("max_target_length", 0, "--max_target_length must be >= 1, got 0"),
        ("eval_steps", -1, "--eval_steps must be >= 0, got -1"),
        ("lr", float("inf"), "--lr must be > 0 and finite, got inf"),
        ("weight_decay", 1.0, "--weight_decay must be in [0, 1), got 1.0"),
    ],
)
def test_numbers_are_checked_the_same_way_for_every_field(tmp_path, field, value, message):
    cfg = TrainConfig(output_dir=str(tmp_path / "r"), train_file="hf:squad", **{field: value})
    _, problems = check_config(cfg)
    assert problems == [message]


def test_resume_may_change_only_how_long_and_how_visibly_a_run_goes_on():
    # config.yaml records the settings as the run resolved them, and a resume compares them resolved
    # (with_mode_defaults): lr and P are given.
    saved = TrainConfig(train_file="t.json", lr=0.3, n_tokens=100, max_steps=4).to_dict()
    allowed, refused = resume_changes(
        saved, TrainConfig(train_file="t.json", lr=0.3, n_tokens=100, max_steps=6, eval_steps=2)
    )
    assert allowed == {"max_steps": (4, 6), "eval_steps": (1000, 2)} and refused == []
    allowed, refused = resume_changes(
        saved, TrainConfig(train_file="t.json", lr=0.01, max_steps=4, n_tokens=5)
    )
    assert allowed == {} and refused == ["n_tokens (100 -> 5)", "lr (0.3 -> 0.01)"]
    assert {"max_steps", "eval_steps", "save_steps", "logging_steps", "report_to"} <= RESUMABLE
    assert not {"lr", "n_tokens", "optimizer", "seed", "model_name_or_path"} & RESUMABLE


def _alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes of YAML whose aliases expand to 10**levels strings."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + f"\nlr: *a{levels - 1}\n"


def test_a_yaml_alias_bomb_is_refused_in_one_line_and_at_once(tmp_path):
    import time

    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb())
    assert p.stat().st_size < 600
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_yaml_config(p)
    assert time.monotonic() - start < 10
    assert str(e.value).startswith(f"{p} is refused: it expands to more than 1,000,000 values")
    assert "\n" not in str(e.value)
    deep = tmp_path / "deep.yaml"
    deep.write_text("lr: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml is refused: it nests deeper than 100 levels"):
        load_yaml_config(deep)


def test_a_bad_value_is_quoted_briefly_however_large_it_is(tmp_path):
    from softprompt.config.fields import short_repr

    # 10**30 items through shared lists, and a 5,000-digit integer: the full repr of the first would
    # never finish and the second raises ValueError; a message quotes the start of each.
    value: list = ["x"] * 10
    for _ in range(29):
        value = [value] * 10
    assert short_repr(value).startswith("[[[[...], [...],") and len(short_repr(value)) <= 63
    assert short_repr(10**5000) == "<an integer of 16,610 bits>"
    p = tmp_path / "big.yaml"
    p.write_text(f"n_tokens: {'9' * 5000}\n")
    with pytest.raises(ConfigError, match=r"big\.yaml is refused: it holds an integer too long to read"):
        load_yaml_config(p)


def test_a_number_field_given_a_list_or_a_huge_integer_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: [1]\nweight_decay: " + "9" * 400 + "\n")
    with pytest.raises(ConfigError) as e:
        load_yaml_config(p)
    assert "'lr' must be a number, got [1]" in str(e.value)
    assert "'weight_decay' must be a number, got <an integer of 1,329 bits>" in str(e.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_data_files_given_as_flags_replace_a_preset_data_source(path, tmp_path):
    """`--config PRESET --train_file F --validation_file F` trains on F: the flags' files replace the
    preset's dataset_name (which would otherwise win and go to the Hub)."""
    from softprompt.commands.train import parse_args

    data = tmp_path / "small.json"
    data.write_text('{"data": []}')
    argv = ["--config", str(path), "--train_file", str(data), "--validation_file", str(data)]
    cfg = parse_args([*argv, "--output_dir", str(tmp_path / "run")])
    assert cfg.dataset_name is None and cfg.train_file == str(data) and cfg.validation_file == str(data)
    assert cfg.lr == load_yaml_config(path).lr  # the rest of the preset still holds


def test_an_empty_value_unsets_an_optional_field(tmp_path):
    """`--dataset_name ""` (or `dataset_name:` left empty in a file) unsets it, instead of reaching
    `datasets` as the name ""."""
    from softprompt.commands.train import parse_args

    preset = tmp_path / "preset.yaml"
    preset.write_text("dataset_name: squad\nvalidation_file: ''\n")
    data = tmp_path / "small.json"
    data.write_text('{"data": []}')
    out = ["--output_dir", str(tmp_path / "run"), "--train_file", str(data)]
    cfg = parse_args(["--config", str(preset), "--dataset_name", "", *out])
    assert cfg.dataset_name is None and cfg.validation_file is None and cfg.train_file == str(data)
    # A dataset named by a flag likewise replaces a file's data files.
    preset.write_text(f"train_file: {data}\nvalidation_file: {data}\n")
    cfg = parse_args(
        ["--config", str(preset), "--dataset_name", "squad", "--output_dir", str(tmp_path / "r")]
    )
    assert cfg.dataset_name == "squad" and cfg.train_file is None and cfg.validation_file is None


def test_hugging_face_trainer_spellings_are_aliases_or_get_the_right_suggestion(tmp_path, capsys):
    """HF Trainer's flags that mean the same as softprompt's are aliases of them; its precision switches
    are suggested as --precision's values, not as the nearest spelling of another flag."""
    from softprompt.commands.train import parse_args

    data = tmp_path / "small.json"
    data.write_text('{"data": []}')
    base = ["--train_file", str(data), "--output_dir", str(tmp_path / "run")]
    argv = [
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--learning_rate",
        "0.1",
    ]
    argv += ["--num_train_epochs", "2", "--gradient_accumulation_steps", "2", "--prompt_length", "7"]
    cfg = parse_args([*base, *argv])
    assert (cfg.batch_size, cfg.eval_batch_size, cfg.lr, cfg.epochs) == (4, 8, 0.1, 2.0)
    assert (cfg.grad_accum_steps, cfg.n_tokens) == (2, 7)
    for flag, hint in (
        ("--bf16", "--precision bf16?"),
        ("--fp16", "--precision bf16? fp16 is not supported"),
    ):
        with pytest.raises(SystemExit) as e:
            parse_args([*base, flag])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"unknown flag {flag} (did you mean {hint})" in err, err


def test_n_tokens_defaults_to_the_starting_prompts_length_then_to_100(tmp_path):
    import torch

    from softprompt.io.checkpoint import PromptConfig, save_prompt
    from softprompt.training.config import prompt_length

    start = save_prompt(tmp_path / "p8", torch.zeros(8, 16), PromptConfig("x", n_tokens=8, d_model=16))
    train = tmp_path / "train.json"
    train.write_text("{}")
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"),
        train_file=str(train),
        prompt_tuning=True,
        prompt_init="from_file",
        prompt_init_file=str(start),
    )
    assert cfg.n_tokens is None and prompt_length(cfg) == 8 and with_mode_defaults(cfg).n_tokens == 8
    assert not [p for p in check_config(cfg)[1] if "n_tokens" in p]
    # Given, it wins where it agrees, and one phrase says so where it does not.
    assert with_mode_defaults(TrainConfig(prompt_tuning=True, n_tokens=20)).n_tokens == 20
    clash = [p for p in check_config(replace(cfg, n_tokens=100))[1] if "n_tokens" in p]
    assert clash == [
        f"--n_tokens 100, but the --prompt_init_file prompt {start} has 8 tokens; drop --n_tokens to take the file's length"
    ]
    assert not [p for p in check_config(replace(cfg, n_tokens=8))[1] if "n_tokens" in p]
    # Not from a file: the paper's 100, as before.
    assert (
        with_mode_defaults(replace(cfg, prompt_init="sampled_vocab", prompt_init_file=None)).n_tokens == 100
    )
