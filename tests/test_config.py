"""Config files, flags and validation: every preset parses, and every problem is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from softprompt.config import TrainConfig, load_yaml_config, resolve_batch, validate, with_mode_defaults
from softprompt.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


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
