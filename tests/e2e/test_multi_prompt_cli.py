"""`softprompt train --num_prompts K` and a `prompts:` config from the command line: K best prompt
directories that eval (and its majority ensemble) take as they are, and bad prompt lists refused in one line."""

from __future__ import annotations

import json

import pytest
import yaml

from softprompt.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_num_prompts_5_ends_with_five_prompt_dirs_that_eval_ensembles(
    tiny_model_dir, squad_small, tmp_path, capsys
):
    train_file, dev_file = squad_small
    out = tmp_path / "run"
    argv = [
        "train", f"--output_dir={out}", "--prompt_tuning", f"--model={tiny_model_dir}", "--random_init",
        f"--train_file={train_file}", f"--validation_file={dev_file}", "--max_eval_samples=6",
        "--max_source_length=64", "--n_tokens=4", "--batch_size=2", "--max_steps=2", "--eval_steps=0",
        "--max_new_tokens=4", "--report_to=none", "--num_prompts=5",
    ]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in lines] == [f"prompt{i}" for i in range(5)]
    dirs = [out / "best" / f"prompt{i}" for i in range(5)]
    assert all((d / "prompt.safetensors").is_file() and (d / "manifest.json").is_file() for d in dirs)
    # Every prompt's seed is the run's seed + i, recorded in its card and in the start record.
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert [p["seed"] for p in start["prompts"].values()] == [42, 43, 44, 45, 46]
    # The random weights were built once with the run's seed: each card's command rebuilds those.
    assert all("--random_init --seed 42" in (d / "README.md").read_text() for d in dirs)
    prompts = [w for d in dirs for w in ("--prompt", str(d))]
    evaluate = ["eval", "--model", str(tiny_model_dir), "--random_init", f"--validation_file={dev_file}",
                "--max_eval_samples=6", "--max_new_tokens=4", "--ensemble", "majority", *prompts]  # fmt: skip
    assert main(evaluate) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["prompts"]) == 5 and "ensemble" in report
    # Each prompt's eval score is the one the run recorded for it at its best step.
    results = json.loads((out / "results.json").read_text())
    for i, d in enumerate(dirs):
        assert report["prompts"][d.name]["f1"] == pytest.approx(
            results["prompts"][f"prompt{i}"]["f1"], abs=1e-9
        )
    assert main(["verify", str(out)]) == 0
    assert "best/prompt4" in capsys.readouterr().out


def test_a_prompts_config_with_a_missing_file_is_one_line_naming_the_entry(
    tiny_model_dir, squad_small, tmp_path, capsys
):
    train_file, _ = squad_small
    config = tmp_path / "two.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "prompt_tuning": True,
                "model_name_or_path": str(tiny_model_dir),
                "random_init": True,
                "prompts": [
                    {"name": "qa", "train_file": str(train_file)},
                    {"name": "qa2", "train_file": str(tmp_path / "missing.json"), "seed": 7},
                ],
            }
        )
    )
    out = tmp_path / "run"
    code = _exit(["train", "--config", str(config), f"--output_dir={out}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert f"prompts[1] 'qa2': --train_file {tmp_path / 'missing.json'} does not exist" in lines[0]
    assert "prompts[0]" not in lines[0]
    assert not out.exists()
    code = _exit(["train", "--config", str(config), f"--output_dir={out}", "--num_prompts=2"])
    assert code == 2 and "--num_prompts and a prompts: list" in capsys.readouterr().err
